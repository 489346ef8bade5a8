import Testing

@Suite struct ColorunTestsPlaceholder {}
