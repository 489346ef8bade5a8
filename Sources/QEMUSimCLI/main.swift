print("qemu-sim: not built yet")
