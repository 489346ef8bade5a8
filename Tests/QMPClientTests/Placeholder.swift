import Testing

@Suite struct QMPClientTestsPlaceholder {}
