"""What both benchmarks measure and report with: peak resident memory, the load, the Markdown table."""
import os
import threading

MIB = 1024 ** 2
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class PeakResidentSet:
    """Peak resident set size (RSS) of this process inside a `with` block, polled every 5 ms from a thread
    (torch and faiss release Python's lock while they work, so the thread sees their peaks)."""

    def __init__(self):
        self.start = self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current():
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * PAGE_BYTES

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.start = self.peak = self.current()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def peak_mib(self):
        """The peak of the whole process."""
        return self.peak / MIB

    @property
    def growth_mib(self):
        """How far the peak rose above the resident size at the start of the block."""
        return (self.peak - self.start) / MIB


def load_average():
    """The system's load averages over 1, 5 and 15 minutes."""
    return [round(value, 2) for value in os.getloadavg()]


def markdown_table(rows, columns):
    """rows: dicts; columns: (key, title, format) each. A row without a key (or with None) leaves the cell empty."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ["" if row.get(key) is None else form.format(row[key]) for key, _, form in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
