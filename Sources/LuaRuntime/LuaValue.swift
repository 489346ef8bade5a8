import CLua
import CLuaShims
import JSON

/// A value crossing from Swift into Lua (host function results, task arguments).
///
/// Scalars map to their Lua types; `.json` pushes a JSON value as Lua data (objects become
/// tables, arrays sequences, JSON null the `json.null` sentinel, integers stay integers);
/// `.object` pushes a Swift object as a userdata with `__gc` (see `LuaRuntime.registerType`);
/// `.ref` pushes a value kept in the Lua registry (for example a Lua function).
public enum LuaValue {
    case `nil`
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case json(JSONValue)
    case object(AnyObject)
    case ref(LuaRef)
}

/// An error raised by a host function. It becomes an ordinary Lua error that `pcall`
/// catches, raised from C after the Swift frame has returned.
///
/// - A plain message is raised as the string `"file:line: message"`, the position being the
///   Lua code that called the host function.
/// - A structured error is raised as a Lua table holding `fields` plus `message` and
///   `where` (`"file:line: "`); its metatable's `__tostring` gives `where .. message`,
///   so an uncaught structured error reads like a plain one.
public struct LuaHostError: Error, Sendable, CustomStringConvertible {
    public var message: String
    /// Extra fields of a structured error (nil: a plain string error).
    public var fields: [String: JSONValue]?
    /// Prefix the caller's `file:line: ` (true unless the message already carries a position).
    public var addsPosition: Bool

    public init(message: String, fields: [String: JSONValue]? = nil, addsPosition: Bool = true) {
        self.message = message
        self.fields = fields
        self.addsPosition = addsPosition
    }

    /// A plain error: raised as `"file:line: message"`.
    public static func message(_ message: String) -> LuaHostError { LuaHostError(message: message) }

    /// A structured error: a table with `fields`, `message`, `where`, and a `__tostring`.
    public static func structured(_ fields: [String: JSONValue], message: String) -> LuaHostError {
        LuaHostError(message: message, fields: fields)
    }

    public var description: String { message }

    init(_ error: any Error) {
        if let e = error as? LuaHostError {
            self = e
        } else if let f = error as? LuaTaskFailure {
            self.init(message: f.message, addsPosition: false)  // already positioned
        } else {
            self.init(message: String(describing: error))
        }
    }
}

/// The Lua type of a value.
public enum LuaType: Int32, Sendable {
    case none = -1, `nil` = 0, boolean = 1, lightUserdata = 2, number = 3, string = 4, table = 5,
        function = 6, userdata = 7, thread = 8

    public var name: String {
        switch self {
        case .none: "no value"
        case .nil: "nil"
        case .boolean: "boolean"
        case .lightUserdata, .userdata: "userdata"
        case .number: "number"
        case .string: "string"
        case .table: "table"
        case .function: "function"
        case .thread: "thread"
        }
    }
}

/// A Lua value anchored in the registry (a Lua function for a timer or an event callback,
/// a table...). It stays valid while the Swift object lives; releasing it (on any thread)
/// frees the registry slot on the runtime's loop.
public final class LuaRef: @unchecked Sendable {
    let owner: LuaStateOwner
    let ref: Int32
    /// The Lua type of the value.
    public let type: LuaType

    init(owner: LuaStateOwner, ref: Int32, type: LuaType) {
        self.owner = owner
        self.ref = ref
        self.type = type
    }

    deinit { owner.deferUnref(ref) }

    func push(_ L: OpaquePointer) {
        lua_rawgeti(L, clua_registryindex(), lua_Integer(ref))
    }
}

extension String {
    /// The string at `idx` (which must be a string or a number; numbers are converted in place).
    init?(lua L: OpaquePointer, at idx: Int32) {
        var len = 0
        guard let p = lua_tolstring(L, idx, &len) else { return nil }
        self = String(decoding: UnsafeRawBufferPointer(start: p, count: len), as: UTF8.self)
    }
}
