import NIOCore
import QMP

/// The pipeline's QMP handler: frames the bytes the channel reads into lines, classifies
/// each as a `QMPServerMessage` (the codec, in the QMP module) and hands messages, errors
/// and the channel's end to the core.
///
/// It does its own framing instead of sitting behind a `ByteToMessageHandler`: a reply goes
/// from the read buffer to the core with no second handler, no `NIOAny` box and no JSON tree
/// of the whole message on the way (every QMP round trip pays for those otherwise).
final class QMPChannelHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer  // command lines, encoded by the core

    let core: QMPConnectionCore
    private var decoder: QMPServerMessageDecoder
    /// Bytes of a line not complete yet (empty between lines, the usual case).
    private var pending: ByteBuffer?
    /// Set once the decoder threw: the connection is being closed and nothing more is read.
    private var failed = false

    init(core: QMPConnectionCore, maxLineLength: Int) {
        self.core = core
        self.decoder = QMPServerMessageDecoder(maxLineLength: maxLineLength)
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
        guard !failed else { return }
        var incoming = unwrapInboundIn(data)
        if var buffer = pending.take() {
            buffer.writeBuffer(&incoming)
            deliver(from: &buffer)
        } else {
            deliver(from: &incoming)
        }
    }

    /// Hands every complete line of `buffer` to the core; keeps the rest for the next read.
    private func deliver(from buffer: inout ByteBuffer) {
        do throws(QMPProtocolError) {
            while let message = try decoder.nextMessage(from: &buffer) {
                core.receive(message)
            }
        } catch {
            failed = true
            core.errorCaught(error)
            return
        }
        if buffer.readableBytes > 0 {
            buffer.discardReadBytes()
            pending = buffer
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        core.errorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        // A trailing partial line is dropped: QEMU always ends its lines.
        pending = nil
        core.channelInactive()
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension QMPChannelHandler: Sendable {}
