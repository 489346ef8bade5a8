import NIOCore
import QMP

/// The thin NIO side of one client connection: queues decoded input, hands it to the
/// domain one command at a time, and carries out the steps that come back.
final class DomainConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = QMPInput
    typealias OutboundOut = QMPServerOutput

    private let domain: SimulatedDomain
    private var id = 0
    /// Inputs read and not served yet, with when each was read (wall clock, for the log).
    private var pending: [(input: QMPInput, arrived: Double)] = []
    private var pendingStart = 0
    /// Waiting out a `delay` fault: later input queues.
    private var busy = false
    private var hung = false
    private var closed = false

    init(domain: SimulatedDomain) {
        self.domain = domain
    }

    func channelActive(context: ChannelHandlerContext) {
        let (id, steps) = domain.connectionOpened(context.channel)
        self.id = id
        run(steps[...], context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        domain.connectionClosed(id)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        pending.append((unwrapInboundIn(data), wallClock()))
        drain(context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event as? DomainSignal {
        case .greet?:
            context.writeAndFlush(wrapOutboundOut(.json(SimulatedQEMU.greeting.json)), promise: nil)
            drain(context: context)
        case .hang?:
            hung = true
        case nil:
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// Serves queued input while this connection holds the monitor and nothing blocks it.
    private func drain(context: ChannelHandlerContext) {
        while !busy, !hung, !closed, pendingStart < pending.count {
            guard let steps = domain.receive(pending[pendingStart].input, from: id, arrived: pending[pendingStart].arrived) else { break }
            pendingStart += 1
            run(steps[...], context: context)
        }
        if pendingStart == pending.count {
            pending.removeAll(keepingCapacity: true)
            pendingStart = 0
        }
    }

    private func run(_ steps: ArraySlice<DomainStep>, context: ChannelHandlerContext) {
        var index = steps.startIndex
        while index < steps.endIndex, !closed {
            switch steps[index] {
            case .send(let output):
                context.write(wrapOutboundOut(output), promise: nil)
            case .wait(let duration):
                context.flush()
                busy = true
                let rest = steps[(index + 1)...]
                let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                let nanos = duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000
                context.eventLoop.scheduleTask(in: .nanoseconds(nanos)) {
                    let (handler, context) = bound.value
                    handler.busy = false
                    handler.run(rest, context: context)
                    handler.drain(context: context)
                }
                return
            case .hang:
                hung = true
            case .close:
                context.flush()
                context.close(promise: nil)
                return
            case .die, .exit:
                let domain = self.domain
                let removeSocket = steps[index] == .exit
                let promise = context.eventLoop.makePromise(of: Void.self)
                context.writeAndFlush(wrapOutboundOut(.raw([])), promise: promise)
                promise.futureResult.whenComplete { _ in
                    Task { await domain.closeEverything(removeSocket: removeSocket) }
                }
                return
            }
            index += 1
        }
        context.flush()
    }
}
