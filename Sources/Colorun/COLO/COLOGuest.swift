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
///
/// The memory-dirtying variant (`dirty`, for the checkpoint-pause benchmark) cannot leave real
/// mode: under this machine kind's nested KVM (kvm-pvm) the first instruction after setting
/// CR0.PE never runs (32-bit protected mode and unreal mode alike), so it dirties memory above
/// 1 MiB through the IDE controller's bus-master DMA instead. It gives the PIIX IDE function
/// an I/O BAR (0xc000) and bus mastering, then reads the first 4 MiB of the disk (LBA48 READ
/// DMA EXT, 8192 sectors, a 64-entry PRD table at 0x9000) into guest memory from 1 MiB up in
/// 4 MiB chunks, again and again: every page written by QEMU's DMA, so dirty, with the disk's
/// content (a test writes a pattern there: memory filled, not zero pages). After each chunk
/// it waits `out 0x80` x the word at +0x1f8 (not in the first pass, which fills memory at full speed); it counts chunks at 0x7e00 and passes at 0x7e04.
/// Region [+0x1f0, +0x1f4) in the image. The code:
///
///     _start:
///       cli
///       xor %ax,%ax
///       mov %ax,%ss
///       mov $0x7000,%sp
///       mov %ax,%ds
///       mov %ax,%es
///       # PIIX IDE (00:01.1): BAR4 = 0xc000 (bus master I/O), command = I/O + bus master
///       mov $0xcf8,%dx
///       mov $0x80000920,%eax
///       out %eax,%dx
///       mov $0xcfc,%dx
///       mov $0xc001,%eax
///       out %eax,%dx
///       mov $0xcf8,%dx
///       mov $0x80000904,%eax
///       out %eax,%dx
///       mov $0xcfc,%dx
///       mov $0x0005,%ax
///       out %ax,%dx
///     outer:
///       mov %cs:0x1f0,%ebx
///     chunk:
///       # PRD table at 0x9000: 64 entries of 64 KiB (4 MiB), the last one marked
///       mov $0x9000,%di
///       mov %ebx,%eax
///       mov $64,%cx
///     4:
///       mov %eax,(%di)
///       movl $0,4(%di)
///       add $0x10000,%eax
///       add $8,%di
///       loop 4b
///       movl $0x80000000,-4(%di)
///       mov $0xc004,%dx
///       mov $0x9000,%eax
///       out %eax,%dx
///       mov $0xc002,%dx
///       mov $0x06,%al
///       out %al,%dx
///       mov $0xc000,%dx
///       mov $0x08,%al
///       out %al,%dx
///       # ATA: LBA48 0, 8192 sectors (4 MiB), READ DMA EXT
///       mov $0x1f6,%dx
///       mov $0x40,%al
///       out %al,%dx
///       mov $0x1f2,%dx
///       mov $0x20,%al
///       out %al,%dx
///       xor %al,%al
///       out %al,%dx
///       mov $0x1f3,%dx
///       out %al,%dx
///       out %al,%dx
///       inc %dx
///       out %al,%dx
///       out %al,%dx
///       inc %dx
///       out %al,%dx
///       out %al,%dx
///       mov $0x1f7,%dx
///       mov $0x25,%al
///       out %al,%dx
///       mov $0xc000,%dx
///       mov $0x09,%al
///       out %al,%dx
///       mov $0xc002,%dx
///     1:
///       in %dx,%al
///       test $0x04,%al
///       jz 1b
///       mov $0xc000,%dx
///       xor %al,%al
///       out %al,%dx
///       mov $0x1f7,%dx
///       in %dx,%al
///       incl 0x7e00
///       cmpl $0,0x7e04
///       je 3f
///       mov %cs:0x1f8,%cx
///       jcxz 3f
///     2:
///       out %al,$0x80
///       loop 2b
///     3:
///       add $0x400000,%ebx
///       lea 0x400000(%ebx),%eax
///       cmp %cs:0x1f4,%eax
///       jbe chunk
///       incl 0x7e04
///       jmp outer
public struct COLOGuest: Sendable, Hashable {
    public var send: Bool
    public var divergent: Bool
    /// `out 0x80` per round (about 60 us each on this machine kind's nested KVM).
    public var delay: UInt16
    /// The DMA dirtier instead of the counting/sending guest: `out 0x80` after each 4 MiB
    /// chunk (0: as fast as QEMU's DMA goes), over guest memory [1 MiB, `dirtyEndMiB`).
    public var dirty: (delay: UInt16, endMiB: Int)? {
        get { dirtyDelay.map { ($0, dirtyEndMiB) } }
        set {
            dirtyDelay = newValue?.delay
            dirtyEndMiB = newValue?.endMiB ?? 0
        }
    }
    private var dirtyDelay: UInt16?
    private var dirtyEndMiB = 0

    public init(send: Bool = false, divergent: Bool = false, delay: UInt16 = 200) {
        self.send = send
        self.divergent = divergent
        self.delay = delay
    }

    /// The DMA dirtier over [1 MiB, `endMiB`) MiB of guest memory (see above).
    public static func dirtying(delay: UInt16, endMiB: Int) -> COLOGuest {
        var guest = COLOGuest()
        guest.dirty = (delay, endMiB)
        return guest
    }

    /// The size of one DMA chunk the dirtier writes (0x7e00 counts them).
    public static let dirtyChunkBytes = 4 << 20

    static let dirtyCode: [UInt8] = [
        0xfa, 0x31, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x70, 0x8e, 0xd8, 0x8e, 0xc0, 0xba, 0xf8, 0x0c, 0x66,
        0xb8, 0x20, 0x09, 0x00, 0x80, 0x66, 0xef, 0xba, 0xfc, 0x0c, 0x66, 0xb8, 0x01, 0xc0, 0x00, 0x00,
        0x66, 0xef, 0xba, 0xf8, 0x0c, 0x66, 0xb8, 0x04, 0x09, 0x00, 0x80, 0x66, 0xef, 0xba, 0xfc, 0x0c,
        0xb8, 0x05, 0x00, 0xef, 0x2e, 0x66, 0x8b, 0x1e, 0xf0, 0x01, 0xbf, 0x00, 0x90, 0x66, 0x89, 0xd8,
        0xb9, 0x40, 0x00, 0x66, 0x89, 0x05, 0x66, 0xc7, 0x45, 0x04, 0x00, 0x00, 0x00, 0x00, 0x66, 0x05,
        0x00, 0x00, 0x01, 0x00, 0x83, 0xc7, 0x08, 0xe2, 0xea, 0x66, 0xc7, 0x45, 0xfc, 0x00, 0x00, 0x00,
        0x80, 0xba, 0x04, 0xc0, 0x66, 0xb8, 0x00, 0x90, 0x00, 0x00, 0x66, 0xef, 0xba, 0x02, 0xc0, 0xb0,
        0x06, 0xee, 0xba, 0x00, 0xc0, 0xb0, 0x08, 0xee, 0xba, 0xf6, 0x01, 0xb0, 0x40, 0xee, 0xba, 0xf2,
        0x01, 0xb0, 0x20, 0xee, 0x30, 0xc0, 0xee, 0xba, 0xf3, 0x01, 0xee, 0xee, 0x42, 0xee, 0xee, 0x42,
        0xee, 0xee, 0xba, 0xf7, 0x01, 0xb0, 0x25, 0xee, 0xba, 0x00, 0xc0, 0xb0, 0x09, 0xee, 0xba, 0x02,
        0xc0, 0xec, 0xa8, 0x04, 0x74, 0xfb, 0xba, 0x00, 0xc0, 0x30, 0xc0, 0xee, 0xba, 0xf7, 0x01, 0xec,
        0x66, 0xff, 0x06, 0x00, 0x7e, 0x66, 0x83, 0x3e, 0x04, 0x7e, 0x00, 0x74, 0x0b, 0x2e, 0x8b, 0x0e,
        0xf8, 0x01, 0xe3, 0x04, 0xe6, 0x80, 0xe2, 0xfc, 0x66, 0x81, 0xc3, 0x00, 0x00, 0x40, 0x00, 0x67,
        0x66, 0x8d, 0x83, 0x00, 0x00, 0x40, 0x00, 0x2e, 0x66, 0x3b, 0x06, 0xf4, 0x01, 0x0f, 0x86, 0x59,
        0xff, 0x66, 0xff, 0x06, 0x04, 0x7e, 0xe9, 0x4b, 0xff,
    ]

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
        if let dirtyDelay {
            image.replaceSubrange(0..<Self.dirtyCode.count, with: Self.dirtyCode)
            let end = UInt32(dirtyEndMiB) << 20
            for (offset, value) in [(0x1f0, UInt32(1 << 20)), (0x1f4, end)] {
                for i in 0..<4 { image[offset + i] = UInt8((value >> (8 * UInt32(i))) & 0xff) }
            }
            image[0x1f8] = UInt8(dirtyDelay & 0xff)
            image[0x1f9] = UInt8(dirtyDelay >> 8)
            image.replaceSubrange(0xfff0..<0xfff5, with: [0xea, 0x00, 0x00, 0x00, 0xf0])
            return image
        }
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
