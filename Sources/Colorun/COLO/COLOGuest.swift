/// The COLO lab's guest: a 64 KiB firmware image QEMU runs with `-bios` (no SeaBIOS: under
/// this machine kind's nested KVM SeaBIOS never reaches a boot sector). From the reset vector
/// it counts in the dword at 0x7e00 (like `CountingGuest`) and, if asked, sends a 60-byte
/// IPv4/UDP frame through the ISA NE2000 at port 0x300 on every round: "COLO", a sequence
/// number, and (`divergent`) the TSC, which differs between the primary and the secondary so
/// that colo-compare sees different output and asks for a checkpoint.
///
/// The code (GNU as, `.code16`, linked at 0 of segment F000; assembled with
/// `as --32` and `ld -m elf_i386 -Ttext 0 --oformat binary`):
///
///     .code16
///     .globl _start
///     _start:
///       cli
///       xor %ax,%ax
///       mov %ax,%ss
///       mov $0x7000,%sp
///       mov %cs,%ax
///       mov %ax,%ds
///       xor %ax,%ax
///       mov %ax,%es
///       mov $frame,%si
///       mov $0x8000,%di
///       mov $64,%cx
///       cld
///       rep movsb
///       xor %ax,%ax
///       mov %ax,%ds
///       mov $0x300,%dx
///       mov $0x21,%al
///       out %al,%dx
///     next:
///       incl 0x7e00
///       cmpb $0,0x803f
///       je pause
///       incl 0x802e
///       cmpb $0,0x803e
///       je 1f
///       rdtsc
///       mov %eax,0x8032
///       mov %edx,0x8036
///     1:
///       mov $0x300,%dx
///       mov $0x22,%al
///       out %al,%dx
///       mov $0x30a,%dx
///       mov $60,%al
///       out %al,%dx
///       inc %dx
///       xor %al,%al
///       out %al,%dx
///       mov $0x308,%dx
///       out %al,%dx
///       inc %dx
///       mov $0x40,%al
///       out %al,%dx
///       mov $0x300,%dx
///       mov $0x12,%al
///       out %al,%dx
///       mov $0x310,%dx
///       mov $0x8000,%si
///       mov $60,%cx
///       rep outsb
///       mov $0x304,%dx
///       mov $0x40,%al
///       out %al,%dx
///       inc %dx
///       mov $60,%al
///       out %al,%dx
///       inc %dx
///       xor %al,%al
///       out %al,%dx
///       mov $0x300,%dx
///       mov $0x26,%al
///       out %al,%dx
///     pause:
///       mov 0x803c,%cx
///     2:
///       out %al,$0x80
///       loop 2b
///       jmp next
///
/// The frame is copied to 0x8000 (seq at +46, TSC at +50); the round's delay (`out 0x80`
/// loops, each a VM exit) is the word at +60, the divergent flag +62, the send flag +63.
public struct COLOGuest: Sendable, Hashable {
    public var send: Bool
    public var divergent: Bool
    /// `out 0x80` per round (about 60 us each on this machine kind's nested KVM).
    public var delay: UInt16

    public init(send: Bool = false, divergent: Bool = false, delay: UInt16 = 200) {
        self.send = send
        self.divergent = divergent
        self.delay = delay
    }

    /// Offset of the frame's "COLO" tag, sequence number and TSC in a frame the guest sends.
    public static let tagOffset = 42
    public static let sequenceOffset = 46
    public static let stampOffset = 50

    static let code: [UInt8] = [
        0xfa, 0x31, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x70, 0x8c, 0xc8, 0x8e, 0xd8, 0x31, 0xc0, 0x8e, 0xc0,
        0xbe, 0x00, 0x01, 0xbf, 0x00, 0x80, 0xb9, 0x40, 0x00, 0xfc, 0xf3, 0xa4, 0x31, 0xc0, 0x8e, 0xd8,
        0xba, 0x00, 0x03, 0xb0, 0x21, 0xee, 0x66, 0xff, 0x06, 0x00, 0x7e, 0x80, 0x3e, 0x3f, 0x80, 0x00,
        0x74, 0x54, 0x66, 0xff, 0x06, 0x2e, 0x80, 0x80, 0x3e, 0x3e, 0x80, 0x00, 0x74, 0x0b, 0x0f, 0x31,
        0x66, 0xa3, 0x32, 0x80, 0x66, 0x89, 0x16, 0x36, 0x80, 0xba, 0x00, 0x03, 0xb0, 0x22, 0xee, 0xba,
        0x0a, 0x03, 0xb0, 0x3c, 0xee, 0x42, 0x30, 0xc0, 0xee, 0xba, 0x08, 0x03, 0xee, 0x42, 0xb0, 0x40,
        0xee, 0xba, 0x00, 0x03, 0xb0, 0x12, 0xee, 0xba, 0x10, 0x03, 0xbe, 0x00, 0x80, 0xb9, 0x3c, 0x00,
        0xf3, 0x6e, 0xba, 0x04, 0x03, 0xb0, 0x40, 0xee, 0x42, 0xb0, 0x3c, 0xee, 0x42, 0x30, 0xc0, 0xee,
        0xba, 0x00, 0x03, 0xb0, 0x26, 0xee, 0x8b, 0x0e, 0x3c, 0x80, 0xe6, 0x80, 0xe2, 0xfc, 0xeb, 0x96,
    ]

    static let frame: [UInt8] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x00,  // broadcast, IPv4
        0x45, 0x00, 0x00, 0x2e, 0, 0, 0, 0, 0x40, 0x11, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,       // UDP 10.0.0.1 -> .2
        0x04, 0xd2, 0x16, 0x2e, 0x00, 0x1a, 0, 0,                                              // 1234 -> 5678
        0x43, 0x4f, 0x4c, 0x4f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                      // "COLO", seq, TSC
    ]

    /// The firmware image (65536 bytes).
    public var firmware: [UInt8] {
        var image = [UInt8](repeating: 0, count: 65536)
        image.replaceSubrange(0..<Self.code.count, with: Self.code)
        image.replaceSubrange(0x100..<(0x100 + Self.frame.count), with: Self.frame)
        image[0x13c] = UInt8(delay & 0xff)
        image[0x13d] = UInt8(delay >> 8)
        image[0x13e] = divergent ? 1 : 0
        image[0x13f] = send ? 1 : 0
        // The reset vector: ljmp $0xf000, $0.
        image.replaceSubrange(0xfff0..<0xfff5, with: [0xea, 0x00, 0x00, 0x00, 0xf0])
        return image
    }
}
