task.spawn(function() sleep("1ms") error({x=1}) end)
local ok, e = pcall(task.all, function() return 1 end, function() error("x") end)
