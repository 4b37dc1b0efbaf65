"""A one-line progress display for long loops: steps, loss, learning rate, tokens/s and ETA."""
import sys
import time


class Progress:
    """One status line, rewritten in place on a terminal; a line per 10% otherwise."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.t0 = total, enabled, time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step, loss, lr, tokens):
        if not self.enabled:
            return
        done = step + 1
        if not self.tty and done % max(1, self.total // 10) and done != self.total:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - done)
        line = (f"step {done}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tokens / max(elapsed, 1e-9):,.0f} tok/s ETA {eta:.0f}s")
        end = "" if self.tty and done != self.total else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
