import Testing

@Suite struct QEMUSimulatorTestsPlaceholder {}
