import ArgumentParser
import Colorun
import ColorunOperator
import Logging
import Metrics
import NIOPosix
import Prometheus

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

    /// Bootstraps swift-metrics with Prometheus and serves it; exit 2 if it cannot listen.
    static func metrics(listen: String, logger: Logger) async throws -> MetricsServer {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        // Pauses and QMP round trips are sub-millisecond to seconds.
        factory.defaultDurationHistogramBuckets = [
            .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5),
            .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
            .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
        ]
        MetricsSystem.bootstrap(factory)
        let address = try MetricsServer.parseListenAddress(listen)
        do {
            let server = try await MetricsServer.start(
                host: address.host, port: address.port, group: MultiThreadedEventLoopGroup.singleton,
                render: { registry.emitToBuffer() })
            logger.info("serving metrics", metadata: ["url": "http://\(listen)/metrics"])
            return server
        } catch {
            writeStandardError("colorun: --metrics-listen '\(listen)': cannot listen: \(error)")
            throw ExitCode(2)
        }
    }
}
