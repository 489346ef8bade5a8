local s = string.rep("x", 1000)
local v = json.decode('{"a":[1,2.5,null]}')
print(v.a[3] == json.null, utf8.char(233), os.time(), math.type(1))
require("json")
