import CLua
import CLuaShims
import Synchronization

/// Owns the `lua_State`; closed when the last owner (the runtime or a `LuaRef`) goes away.
/// Registry references dropped by `LuaRef`s on any thread are freed later on the loop.
final class LuaStateOwner: @unchecked Sendable {
    let L: OpaquePointer
    let ctx: UnsafeMutablePointer<clua_ctx>
    var hostFunctions: [HostFunctionBox] = []
    private let pendingUnrefs = Mutex<[Int32]>([])

    init(memoryLimit: Int, instructionSlice: Int32) throws {
        clua_set_dispatch(luaDispatch)
        clua_set_release(luaRelease)
        guard let L = clua_newstate(memoryLimit, instructionSlice) else {
            throw LuaHostError.message("cannot create a Lua state")
        }
        self.L = L
        self.ctx = clua_ctx_of(L)
    }

    func deferUnref(_ ref: Int32) {
        pendingUnrefs.withLock { $0.append(ref) }
    }

    /// Frees registry slots released by dropped `LuaRef`s. Call on the loop.
    func drainUnrefs() {
        let refs = pendingUnrefs.withLock { refs -> [Int32] in
            if refs.isEmpty { return [] }
            defer { refs.removeAll(keepingCapacity: true) }
            return refs
        }
        for r in refs { luaL_unref(L, clua_registryindex(), r) }
    }

    deinit {
        clua_closestate(L)
    }
}
