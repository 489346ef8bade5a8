import JSON
import LuaRuntime
import QMP

/// The fields of `colo.policy{...}` and their checks. An unknown field or a wrong type is
/// an error naming the field, raised at the policy line that called `colo.policy`.
enum DeclarativePolicy {
    enum Kind: String {
        case domain, duration, string, integer, number, table, function
    }

    static let fields: [String: Kind] = [
        "primary": .domain, "secondary": .domain, "interval": .duration, "mode": .string, "keep": .integer,
        "retry": .table, "on_failover": .function, "on_checkpoint": .function, "on_checkpoint_error": .function,
        "heartbeat": .duration, "heartbeat_timeout": .duration,
    ]
    static let required = ["primary", "secondary", "interval"]
    static let retryFields: [String: Kind] = [
        "attempts": .integer, "backoff": .duration, "max_backoff": .duration, "jitter": .number,
        "retry_on": .function, "on_retry": .function,
    ]

    static func validate(_ call: LuaCall) throws {
        let given = try call.fields(1)
        try check(given, against: fields, what: "colo.policy", call: call, valueOf: { try call.field(1, $0) })
        for name in required where !given.contains(where: { $0.key == name }) {
            throw LuaHostError.message("colo.policy: field '\(name)' is required")
        }
        if case .string(let mode)? = try call.field(1, "mode"), mode != "xen", mode != "remus" {
            throw LuaHostError.message("colo.policy: field 'mode' must be \"xen\" or \"remus\", got \"\(mode)\"")
        }
        if let keep = try call.field(1, "keep")?.intValue, keep < 1 {
            throw LuaHostError.message("colo.policy: field 'keep' must be at least 1, got \(keep)")
        }
        let retry = try call.fields(1, in: "retry")
        try check(retry, against: retryFields, what: "colo.policy: retry", call: call, valueOf: { key in
            try call.field(1, "retry")?[key]
        })
    }

    private static func check(_ given: [LuaField], against schema: [String: Kind], what: String, call: LuaCall,
                              valueOf: (String) throws -> JSONValue?) throws {
        for field in given {
            guard let kind = schema[field.key] else {
                let known = schema.keys.sorted().joined(separator: ", ")
                throw LuaHostError.message("\(what): unknown field '\(field.key)' (known: \(known))")
            }
            let ok: Bool
            switch kind {
            case .domain: ok = field.type == .table && field.typeName == "domain"
            case .duration:
                if field.type == .number {
                    ok = (try valueOf(field.key)?.doubleValue).map { $0 >= 0 } ?? false
                } else if field.type == .string, let text = try valueOf(field.key)?.stringValue {
                    do {
                        _ = try LuaDuration(parsing: text)
                        ok = true
                    } catch {
                        throw LuaHostError.message("\(what): field '\(field.key)': \(error)")
                    }
                } else {
                    ok = false
                }
            case .string: ok = field.type == .string
            case .number: ok = field.type == .number
            case .integer:
                let value = try valueOf(field.key)
                ok = field.type == .number && value?.intValue != nil
            case .table: ok = field.type == .table
            case .function: ok = field.type == .function
            }
            if !ok {
                let got = field.typeName ?? field.type.name
                let want = kind == .duration ? "duration (seconds or a string like \"200ms\")" : kind.rawValue
                throw LuaHostError.message("\(what): field '\(field.key)' must be a \(want), got \(got)")
            }
        }
    }
}
