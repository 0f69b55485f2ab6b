"""Fixture /proc trees: cpuinfo, stat advancing at a chosen utilisation, meminfo, boot_id."""

from __future__ import annotations

from pathlib import Path

from carbond.procfs import USER_HZ


class ProcTree:
    def __init__(
        self,
        root: Path,
        *,
        model: str = "Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz",
        sockets: int = 1,
        cpus_per_socket: int = 2,
        mem_kb: int = 16 * 1024 * 1024,
        physical_ids: bool = True,
        flags: str = "fpu vme de pse tsc msr",
    ) -> None:
        """``flags``: the cpuinfo flags line (add ``hypervisor`` for a virtual machine's)."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.cpus = sockets * cpus_per_socket
        self.socket_of = [cpu // cpus_per_socket for cpu in range(self.cpus)]
        # per cpu: user nice system idle iowait irq softirq steal guest guest_nice
        self.jiffies = [[0] * 10 for _ in range(self.cpus)]
        blocks = []
        for cpu in range(self.cpus):
            lines = [f"processor\t: {cpu}", "vendor_id\t: GenuineIntel", f"model name\t: {model}"]
            if physical_ids:
                lines.append(f"physical id\t: {self.socket_of[cpu]}")
            lines.append(f"flags\t\t: {flags}")
            blocks.append("\n".join(lines) + "\n")
        (root / "cpuinfo").write_text("\n".join(blocks))
        (root / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:        {mem_kb // 2} kB\n")
        (root / "sys/kernel/random").mkdir(parents=True, exist_ok=True)
        (root / "sys/kernel/random/boot_id").write_text("0f9d3c1e-6f0a-4b5e-9a57-1c2d3e4f5a6b\n")
        self.write_stat()

    def advance(self, seconds: float, utilisation: float | list[float], guest_share: float = 0.0) -> None:
        """Every CPU of socket s spends ``utilisation[s]`` of ``seconds`` busy (user), the rest idle.

        ``guest_share`` of the busy time is also counted in guest, as the kernel does (guest is inside user).
        """
        per_socket = utilisation if isinstance(utilisation, list) else [utilisation] * (max(self.socket_of) + 1)
        for cpu in range(self.cpus):
            total = round(seconds * USER_HZ)
            busy = round(total * per_socket[self.socket_of[cpu]])
            j = self.jiffies[cpu]
            j[0] += busy
            j[3] += total - busy
            j[8] += round(busy * guest_share)
        self.write_stat()

    def write_stat(self) -> None:
        agg = [sum(col) for col in zip(*self.jiffies, strict=True)]
        lines = ["cpu  " + " ".join(map(str, agg))]
        lines += [f"cpu{i} " + " ".join(map(str, j)) for i, j in enumerate(self.jiffies)]
        lines += ["intr 0", "ctxt 0", "btime 1700000000", "processes 1"]
        tmp = self.root / ".stat.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.root / "stat")  # atomic, as a reader in another thread needs
