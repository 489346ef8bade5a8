import ArgumentParser
import Colorun
import ColorunOperator
import Logging
import Metrics
import NIOPosix

/// What only the executable does: pick the log and metrics backends.
enum Bootstrap {
    static func logging(format: LogFormat, level: Logger.Level) {
        LoggingSystem.bootstrap { label in
            switch format {
            case .json:
                var handler = JSONLogHandler(label: label)
                handler.logLevel = level
                return handler
            case .text:
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
        }
    }

    /// Bootstraps swift-metrics with Prometheus (every metric with its HELP text) and starts
    /// serving it; exit 2 if it cannot listen.
    static func metrics(listen: String, logger: Logger) async throws -> MetricsServer {
        let factory = ColorunPrometheusFactory()
        MetricsSystem.bootstrap(factory)
        let address = try MetricsServer.parseListenAddress(listen)
        do {
            let server = try await MetricsServer.start(
                host: address.host, port: address.port, group: MultiThreadedEventLoopGroup.singleton,
                render: { factory.render() })
            logger.info("serving metrics", metadata: ["url": "http://\(listen)/metrics"])
            return server
        } catch {
            writeStandardError("colorun: --metrics-listen '\(listen)': cannot listen: \(error)")
            throw ExitCode(2)
        }
    }
}
