import JSON
import LuaRuntime
import NIOCore
import Subprocess

extension PolicySession {
    /// `exec.run{"/usr/bin/fence", "host1", timeout="5s"}`: argv (no shell), captured stdout
    /// and stderr (up to 1 MiB each), the exit status or the signal, a timeout. Refused unless
    /// the run allows it (`allowExec`, the `--allow-exec` option).
    func registerExec() throws {
        try runtime.registerModule("exec", functions: [
            "run": .async { [unowned self] call, completion in try execRun(call, completion) },
        ])
    }

    private func execRun(_ call: LuaCall, _ completion: LuaCompletion) throws {
        guard call.type(1) == .table else { throw call.typeError(1, "table {argv..., timeout=}") }
        let accepted = LuaAPI.acceptedFields["exec.run#1"] ?? []
        for field in try call.fields(1) where !field.key.hasPrefix("[") && !accepted.contains(field.key) {
            throw LuaHostError.message("exec.run: unknown field '\(field.key)' (known: \(accepted.sorted().joined(separator: ", ")))")
        }
        guard options.allowExec else {
            throw LuaHostError.message("exec.run is disabled: start colorun with --allow-exec to let policies run commands")
        }
        let argv = try call.stringArray(1, name: "argv")
        guard let program = argv.first, !program.isEmpty else { throw call.argumentError(1, "empty argv") }
        let limit = try call.durationField(1, "timeout") ?? LuaDuration(seconds: Double(options.execDefaultTimeout.nanoseconds) / 1e9)
        let arguments = Array(argv.dropFirst())
        // With an arbiter, site hooks learn who this node is and its fencing token.
        var hookEnvironment: [Environment.Key: String?] = [:]
        if let arbiter {
            hookEnvironment["COLORUN_NODE"] = arbiter.options.node
            hookEnvironment["COLORUN_PAIR"] = arbiter.options.pair
            hookEnvironment["COLORUN_FENCING_TOKEN"] = arbiter.token.map(String.init) ?? ""
        }
        let environment = hookEnvironment
        let loop = eventLoop
        let work = Task<Void, Never> {
            do {
                let executable: Executable = program.contains("/") ? .path(.init(program)) : .name(program)
                let result = try await Subprocess.run(
                    executable, arguments: Arguments(arguments), environment: .inherit.updating(environment),
                    output: .string(limit: 1 << 20), error: .string(limit: 1 << 20))
                var fields: [String: JSONValue] = [
                    "stdout": .string(result.standardOutput),
                    "stderr": .string(result.standardError),
                ]
                switch result.terminationStatus {
                case .exited(let code):
                    fields["status"] = .int(Int64(code))
                    fields["ok"] = .bool(code == 0)
                case .signaled(let sig):
                    fields["signal"] = .int(Int64(sig))
                    fields["ok"] = .bool(false)
                }
                let value = JSONValue.object(fields)
                loop.execute { if !completion.isCancelled { completion.succeed([.json(value)]) } }
            } catch {
                // After a timeout or the end of the run the call is already completed (and
                // the runtime may be gone): only a call still waiting hears of the error.
                let message = "exec.run: \(program): \(error)"
                loop.execute { if !completion.isCancelled { completion.fail(LuaHostError.message(message)) } }
            }
        }
        let timer = loop.scheduleTask(in: limit.timeAmount) {
            work.cancel()
            completion.fail(LuaHostError.message("exec.run: \(program) timed out after \(limit)"))
        }
        completion.onCancel {
            timer.cancel()
            work.cancel()
        }
        _ = Task<Void, Never> {
            await work.value
            loop.execute { timer.cancel() }
        }
    }
}
