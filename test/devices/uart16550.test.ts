import { test } from "node:test";
import assert from "node:assert/strict";
import { Uart16550 } from "../../src/devices/emulated/uart16550.js";
import { DeviceRestoreError } from "../../src/devices/emulated/saved-state.js";
import { CollectingSink, RecordingIrqLine, SeededRandom, freshState } from "./device-fakes.js";

const R = "registers";
const DATA = 0, IER = 1, IIR = 2, FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7;

function make() {
  const irq = new RecordingIrqLine();
  const sink = new CollectingSink();
  const state = freshState(Uart16550.layout);
  const uart = new Uart16550("com1", state, { irq, output: sink }, { base: 0x3f8 });
  return { uart, irq, sink, state };
}

/** Roughly what serial8250 does when it opens the port at 115200 8N1. */
function linuxInit(uart: Uart16550): void {
  uart.write(R, LCR, 1, 0x80); // DLAB
  uart.write(R, DATA, 1, 0x01);
  uart.write(R, IER, 1, 0x00);
  uart.write(R, LCR, 1, 0x03); // 8N1
  uart.write(R, FCR, 1, 0x01);
  uart.write(R, FCR, 1, 0x07); // enable + clear RX/TX
  uart.write(R, FCR, 1, 0x81); // trigger 8
  uart.write(R, MCR, 1, 0x0b); // DTR RTS OUT2
  uart.write(R, IER, 1, 0x05); // RX data + line status
}

test("region: 8 ports at the configured base", () => {
  const { uart } = make();
  assert.deepEqual(uart.regions, [{ name: "registers", space: "pio", start: 0x3f8, length: 8 }]);
});

test("divisor latch and LCR", () => {
  const { uart } = make();
  uart.write(R, LCR, 1, 0x83);
  uart.write(R, DATA, 1, 0x0c);
  uart.write(R, IER, 1, 0x01);
  assert.equal(uart.read(R, DATA, 1), 0x0c);
  assert.equal(uart.read(R, IER, 1), 0x01);
  uart.write(R, LCR, 1, 0x03);
  assert.equal(uart.read(R, LCR, 1), 0x03);
  assert.equal(uart.read(R, IER, 1), 0x00, "IER untouched by DLM write");
  assert.equal(uart.save().divisor, 0x010c);
});

test("scratch register", () => {
  const { uart } = make();
  for (const v of [0xa5, 0x5a, 0x00]) {
    uart.write(R, SCR, 1, v);
    assert.equal(uart.read(R, SCR, 1), v);
  }
});

test("transmit: bytes reach the sink; LSR THRE|TEMT", () => {
  const { uart, sink } = make();
  linuxInit(uart);
  for (const c of "hello\n") uart.write(R, DATA, 1, c.charCodeAt(0));
  assert.equal(sink.text(), "hello\n");
  assert.equal(uart.read(R, LSR, 1) & 0x60, 0x60);
});

test("FIFO mode shows in IIR bits 6-7", () => {
  const { uart } = make();
  assert.equal(uart.read(R, IIR, 1), 0x01);
  uart.write(R, FCR, 1, 0x01);
  assert.equal(uart.read(R, IIR, 1), 0xc1);
  uart.write(R, FCR, 1, 0x00);
  assert.equal(uart.read(R, IIR, 1), 0x01);
});

test("THRE interrupt: raised on ETBEI enable, cleared by IIR read, owed after THR writes until the UART is looked at, gated by OUT2", () => {
  const { uart, irq, sink } = make();
  linuxInit(uart);
  assert.equal(irq.level, false);
  uart.write(R, IER, 1, 0x07);
  assert.equal(irq.level, true);
  assert.equal(uart.read(R, IIR, 1) & 0x0f, 0x02);
  assert.equal(irq.level, false, "IIR read that reports THRE clears it");
  assert.equal(uart.read(R, IIR, 1) & 0x0f, 0x01);
  // A burst of THR writes (Linux writes up to 16 per interrupt): the bytes leave at once, the line does not move.
  const calls = irq.calls.length;
  for (const c of "0123456789abcdef") uart.write(R, DATA, 1, c.charCodeAt(0));
  assert.equal(sink.text(), "0123456789abcdef");
  assert.equal(irq.calls.length, calls, "no line change per byte");
  assert.equal(uart.transmitUnsettled, true);
  // The driver's next look (its handler re-reads IIR) finds THRE pending and clears it: still no line change.
  assert.equal(uart.read(R, IIR, 1) & 0x0f, 0x02, "THRE owed for the burst");
  assert.equal(irq.calls.length, calls);
  assert.equal(uart.transmitUnsettled, false);
  assert.equal(uart.read(R, IIR, 1) & 0x0f, 0x01);
  // LSR always shows the transmitter empty, before and after settling.
  uart.write(R, DATA, 1, 0x41);
  assert.equal(uart.read(R, LSR, 1) & 0x60, 0x60);
  assert.equal(irq.level, true, "looking at LSR settled the byte: THRE raised (ETBEI on)");
  assert.equal(uart.read(R, IIR, 1) & 0x0f, 0x02);
  assert.equal(irq.level, false);
  // A driver that waits for the interrupt without another access: the host settles it.
  const rises = irq.rises();
  uart.write(R, DATA, 1, 0x42);
  assert.equal(irq.level, false);
  uart.settleTransmit();
  assert.equal(irq.level, true);
  assert.equal(irq.rises(), rises + 1);
  uart.settleTransmit();
  assert.equal(irq.rises(), rises + 1, "settling twice raises once");
  // A THR write while THRE is pending drops it (the next look gives a fresh edge).
  uart.write(R, DATA, 1, 0x43);
  assert.equal(irq.level, false);
  uart.settleTransmit();
  assert.equal(irq.rises(), rises + 2);
  // Disabling ETBEI drops the line; re-enabling raises it (Linux's UART_BUG_THRE probe).
  uart.write(R, IER, 1, 0x05);
  assert.equal(irq.level, false);
  uart.write(R, IER, 1, 0x07);
  assert.equal(irq.level, true);
  // OUT2 gate.
  uart.write(R, MCR, 1, 0x03);
  assert.equal(irq.level, false);
  assert.equal(uart.read(R, IIR, 1) & 0x0f, 0x02, "condition still reported in IIR");
  uart.write(R, MCR, 1, 0x0b);
  assert.equal(irq.level, false, "the IIR read cleared it");
});

test("polled output with interrupts off (the kernel's console): no line change, LSR always ready", () => {
  const { uart, irq, sink } = make();
  linuxInit(uart);
  uart.write(R, IER, 1, 0x00);
  const calls = irq.calls.length;
  for (const c of "printk line\n") {
    assert.equal(uart.read(R, LSR, 1) & 0x20, 0x20);
    uart.write(R, DATA, 1, c.charCodeAt(0));
  }
  assert.equal(sink.text(), "printk line\n");
  assert.equal(irq.calls.length, calls);
  // Enabling ETBEI afterwards raises THRE at once, as before.
  uart.write(R, IER, 1, 0x02);
  assert.equal(irq.level, true);
});

test("a transmission not yet settled is saved as a pending THRE interrupt", () => {
  const { uart, irq } = make();
  linuxInit(uart);
  uart.write(R, IER, 1, 0x07);
  uart.read(R, IIR, 1);
  uart.write(R, DATA, 1, 0x41);
  const saved = uart.save();
  assert.equal(saved.thrInterruptPending, true);
  assert.equal(uart.transmitUnsettled, true, "save() changes nothing");
  const other = make();
  other.uart.restore(saved);
  assert.equal(other.irq.level, true, "restored with THRE pending: the line is up");
  assert.equal(other.uart.transmitUnsettled, false);
  assert.equal(irq.level, false);
});

test("receive: RDA at trigger level, timeout below, cleared when drained", () => {
  const { uart, irq } = make();
  linuxInit(uart); // trigger level 8
  assert.equal(uart.receive(new TextEncoder().encode("abc")), 3);
  assert.equal(irq.level, true);
  assert.equal(uart.read(R, IIR, 1), 0xcc, "below trigger: character timeout");
  assert.equal(uart.receive(new TextEncoder().encode("defgh")), 5);
  assert.equal(uart.read(R, IIR, 1), 0xc4, "at trigger: RX data available");
  let got = "";
  while (uart.read(R, LSR, 1) & 0x01) got += String.fromCharCode(uart.read(R, DATA, 1));
  assert.equal(got, "abcdefgh");
  assert.equal(irq.level, false);
  assert.equal(uart.read(R, IIR, 1), 0xc1);
});

test("receive: 256-byte buffer, backpressure, FCR clear", () => {
  const { uart } = make();
  linuxInit(uart);
  assert.equal(uart.rxFree(), 256);
  assert.equal(uart.receive(new Uint8Array(300).fill(0x55)), 256);
  assert.equal(uart.rxFree(), 0);
  assert.equal(uart.receive(Uint8Array.of(1)), 0);
  uart.write(R, FCR, 1, 0x83);
  assert.equal(uart.rxFree(), 256);
  assert.equal(uart.read(R, LSR, 1) & 0x01, 0);
});

test("receiverReady: only once the driver's open is complete (IER receive interrupts, then RTS); not in loopback", () => {
  const { uart } = make();
  assert.equal(uart.receiverReady(), false, "reset state");
  // serial8250_do_startup: FIFOs cleared, MCR OUT2|DTR, then receive interrupts on ...
  uart.write(R, FCR, 1, 0x07);
  uart.write(R, FCR, 1, 0x00);
  uart.write(R, MCR, 1, 0x09);
  uart.write(R, IER, 1, 0x05);
  assert.equal(uart.receiverReady(), false, "interrupts on, but the line is not set yet");
  // ... set_termios enables the FIFO, which clears it: bytes fed before this were lost ...
  uart.write(R, LCR, 1, 0x03);
  uart.write(R, FCR, 1, 0x01);
  uart.write(R, FCR, 1, 0x81);
  assert.equal(uart.receiverReady(), false);
  // ... and tty_port_block_til_ready raises DTR and RTS.
  uart.write(R, MCR, 1, 0x0b);
  assert.equal(uart.receiverReady(), true);
  uart.write(R, MCR, 1, 0x1b);
  assert.equal(uart.receiverReady(), false, "loopback disconnects the serial input");
  uart.write(R, MCR, 1, 0x0b);
  uart.write(R, IER, 1, 0x00);
  assert.equal(uart.receiverReady(), false, "receive interrupts off");
});

test("non-FIFO mode: RDA with one byte", () => {
  const { uart, irq } = make();
  uart.write(R, MCR, 1, 0x08);
  uart.write(R, IER, 1, 0x01);
  uart.receive(Uint8Array.of(0x31));
  assert.equal(uart.read(R, IIR, 1), 0x04);
  assert.equal(irq.level, true);
  assert.equal(uart.read(R, DATA, 1), 0x31);
  assert.equal(irq.level, false);
});

test("loopback: THR echoes into RBR, MSR follows MCR, nothing leaves", () => {
  const { uart, sink } = make();
  linuxInit(uart);
  assert.equal(uart.read(R, MSR, 1) & 0xf0, 0xb0, "CTS DSR DCD when not in loopback");
  // serial8250 autoconfig: MCR = LOOP | OUT2 | RTS, expects MSR & 0xf0 == 0x90.
  uart.write(R, MCR, 1, 0x1a);
  assert.equal(uart.read(R, MSR, 1) & 0xf0, 0x90);
  uart.write(R, MCR, 1, 0x1f);
  assert.equal(uart.read(R, MSR, 1) & 0xf0, 0xf0);
  assert.equal(uart.rxFree(), 0, "serial input disconnected in loopback");
  uart.write(R, DATA, 1, 0x5a);
  assert.equal(uart.read(R, LSR, 1) & 0x01, 1);
  assert.equal(uart.read(R, DATA, 1), 0x5a);
  assert.deepEqual(sink.bytes, []);
  uart.write(R, MCR, 1, 0x0b);
  assert.equal(uart.rxFree(), 256);
});

test("modem status interrupt on delta, cleared by MSR read", () => {
  const { uart, irq } = make();
  uart.write(R, MCR, 1, 0x08);
  uart.write(R, IER, 1, 0x08);
  assert.equal(irq.level, false);
  uart.write(R, MCR, 1, 0x18); // loopback: CTS/DSR drop, DCD follows OUT2
  assert.equal(irq.level, true);
  assert.equal(uart.read(R, IIR, 1), 0x00);
  const msr = uart.read(R, MSR, 1);
  assert.equal(msr & 0x0f, 0x03);
  assert.equal(irq.level, false);
});

test("loopback overrun sets LSR.OE and the line status interrupt, which outranks RX data", () => {
  const { uart, irq } = make();
  uart.write(R, FCR, 1, 0x01);
  uart.write(R, MCR, 1, 0x18);
  uart.write(R, IER, 1, 0x05);
  for (let i = 0; i < 257; i++) uart.write(R, DATA, 1, i & 0xff);
  assert.equal(uart.read(R, IIR, 1), 0xc6);
  assert.equal(irq.level, true);
  const lsr = uart.read(R, LSR, 1);
  assert.equal(lsr & 0x03, 0x03);
  assert.equal(uart.read(R, LSR, 1) & 0x02, 0, "OE clears on read");
  assert.equal(uart.read(R, IIR, 1), 0xc4);
});

test("wide accesses split into byte accesses", () => {
  const { uart } = make();
  uart.write(R, LCR, 2, 0x0b03); // LCR=3, MCR=0x0b
  assert.equal(uart.read(R, MCR, 1), 0x0b);
  assert.equal(uart.read(R, SCR, 2), 0xff00, "byte past the region reads 0xff");
});

test("save → restore into fresh state behaves identically", () => {
  const a = make();
  linuxInit(a.uart);
  a.uart.write(R, IER, 1, 0x07);
  a.uart.write(R, SCR, 1, 0x77);
  a.uart.receive(new TextEncoder().encode("xyz"));
  a.uart.read(R, DATA, 1); // leaves head at 1
  const saved = JSON.parse(JSON.stringify(a.uart.save())) as unknown;
  const b = make();
  b.uart.restore(saved);
  assert.equal(b.irq.level, a.irq.level);
  assert.deepEqual(b.uart.save(), a.uart.save());
  for (const off of [IIR, LSR, DATA, DATA, LSR, IIR, MSR, SCR, LCR, MCR, IER])
    assert.equal(b.uart.read(R, off, 1), a.uart.read(R, off, 1), `offset ${off}`);
  assert.equal(b.irq.level, a.irq.level);
});

test("restore rejects garbage", () => {
  const { uart } = make();
  const good = uart.save();
  for (const bad of [
    null, 42, "x", [], { ...good, kind: "i8042" }, { ...good, version: 2 }, { ...good, ier: 0x10 },
    { ...good, rx: new Array(257).fill(0) }, { ...good, rx: [256] }, { ...good, divisor: -1 },
    { ...good, fcr: 0x40 }, { ...good, thrInterruptPending: 1 }, { ...good, lsrErrors: 0x20 },
  ]) assert.throws(() => uart.restore(bad), DeviceRestoreError, JSON.stringify(bad));
});

test("fuzz: 100k random accesses keep the invariants", () => {
  const { uart, irq, state } = make();
  const rnd = new SeededRandom(0x16550);
  const sizes = [1, 1, 1, 1, 2, 4] as const;
  for (let i = 0; i < 100_000; i++) {
    const op = rnd.int(10);
    if (op < 4) uart.read(R, rnd.int(8), rnd.pick(sizes));
    else if (op < 9) uart.write(R, rnd.int(8), rnd.pick(sizes), rnd.int(0x100000000));
    else {
      const free = uart.rxFree();
      const n = rnd.int(40);
      const took = uart.receive(new Uint8Array(n).fill(rnd.int(256)));
      assert.equal(took, Math.min(n, free));
    }
    assert.ok(state.rxCount <= 256);
    assert.equal(irq.level, uart.irqCondition());
    assert.equal(state.irqLevel === 1, irq.level);
    assert.ok(state.ier <= 0x0f && state.mcr <= 0x1f);
  }
  const saved = uart.save();
  const b = make();
  b.uart.restore(saved);
  assert.deepEqual(b.uart.save(), saved);
});
