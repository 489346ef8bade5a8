print("colorun: not built yet")
