import JSON
import NIOCore
import QMP

/// The pipeline's last handler: hands decoded JSON, errors and the channel's end to the core.
final class QMPChannelHandler: ChannelInboundHandler {
    typealias InboundIn = JSONValue
    typealias OutboundOut = ByteBuffer  // command lines, encoded by the core

    let core: QMPConnectionCore

    init(core: QMPConnectionCore) {
        self.core = core
    }

    func handlerAdded(context: ChannelHandlerContext) {
        core.attach(context)
        if context.channel.isActive { core.channelActive() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        core.detach()
    }

    func channelActive(context: ChannelHandlerContext) {
        core.channelActive()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        core.receive(unwrapInboundIn(data))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        core.errorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        core.channelInactive()
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension QMPChannelHandler: Sendable {}
