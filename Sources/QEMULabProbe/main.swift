// qemulab-probe: a process for QEMULabTests to kill or let exit, to see what outlives it.
//
//   QEMULabProbe qemus N                  starts N lab QEMUs (each from its own task), then
//                                          waits to be killed
//   QEMULabProbe spawn owned|detached PIDFILE COMMAND...
//                                          starts COMMAND, writes its pid to PIDFILE, exits 0
import ColorunSystem
import QEMULab

#if canImport(Glibc)
import Glibc
#endif

func fail(_ message: String) -> Never {
    let line = Array("QEMULabProbe: \(message)\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(2)
}

let arguments = Array(CommandLine.arguments.dropFirst())
switch arguments.first {
case "qemus":
    guard arguments.count == 2, let count = Int(arguments[1]), count > 0 else { fail("usage: qemus N") }
    let instances = await withTaskGroup(of: Result<QEMUInstance, QEMULabError>.self) { group in
        for _ in 0..<count {
            group.addTask { () -> Result<QEMUInstance, QEMULabError> in
                do { return .success(try QEMUInstance.start()) } catch { return .failure(QEMULabError("\(error)")) }
            }
        }
        var started: [QEMUInstance] = []
        for await result in group {
            switch result {
            case .success(let instance): started.append(instance)
            case .failure(let error): fail("\(error)")
            }
        }
        return started
    }
    // Until killed; the instances stay referenced.
    while true {
        try? await Task.sleep(for: .seconds(3600))
        _ = instances.count
    }
case "spawn":
    guard arguments.count >= 4, let lifetime = ["owned": ChildLifetime.owned, "detached": .detached][arguments[1]] else {
        fail("usage: spawn owned|detached PIDFILE COMMAND...")
    }
    do {
        let pid = try spawnChild(Array(arguments[3...]), lifetime: lifetime)
        try writeFile(arguments[2], Array("\(pid)\n".utf8))
    } catch {
        fail("\(error)")
    }
default:
    fail("usage: qemus N | spawn owned|detached PIDFILE COMMAND...")
}
