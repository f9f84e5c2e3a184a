"""The printed report: one table per scenario, then the issue's targets, met or not.

Targets are printed, never asserted: absolute figures on a shared 2-core machine
drift, so the verdicts are for reading, not for failing a build.
"""

from .scenarios import summary_rows


def _rate(v, unit):
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _cpu(v, per_gib, unit):
    if v is None:
        return "-"
    if per_gib:
        return f"{v:.2f} s/GiB"
    return f"{v:,.0f} µs/{unit.split('/')[0]}"


def scenario_table(results, sc, rounds):
    lines = [f"{sc.title}  [{rounds} round{'s' if rounds > 1 else ''}]",
             f"  {'front':<14}{'median':>12} {sc.unit:<7}{'min..max':>19}"
             f"{'CPU':>16}{'peak RSS':>11}   vs {sc.anchor}"]
    for name, med, lo, hi, cpu, rss, ratio in summary_rows(results, sc):
        spread = f"{_rate(lo, sc.unit)}..{_rate(hi, sc.unit)}" if lo is not None else "-"
        lines.append(
            f"  {name:<14}{_rate(med, sc.unit):>12} {'':<7}{spread:>19}"
            f"{_cpu(cpu, sc.per_gib, sc.unit):>16}"
            f"{(f'{rss:.1f} MiB' if rss is not None else '-'):>11}"
            f"   {(f'{ratio:.2f}x' if ratio is not None else '-')}")
    return "\n".join(lines)


class Targets:
    """Rows of (target, measured, wanted, verdict)."""

    def __init__(self, results):
        self.res = results
        self.rows = []

    def _add(self, label, value, wanted, ok, fmt):
        if value is None:
            self.rows.append((label, "not measured", wanted, "n/a"))
        else:
            self.rows.append((label, fmt(value), wanted, "met" if ok(value) else "NOT met"))

    def ratio_at_least(self, label, key, front, anchor, minimum):
        if key not in self.res.scenarios:
            return
        v = self.res.ratio(key, front, anchor) if self.res.has(key, front) else None
        # Three decimals below 10x, so that 0.997x does not print as a "1.00x" that failed.
        self._add(label, v, f">= {minimum:g}x", lambda x: x >= minimum,
                  lambda x: f"{x:.3f}x" if x < 10 else f"{x:.1f}x")

    def cpu_at_most(self, label, key, front, maximum):
        sc = self.res.scenarios.get(key)
        if sc is None:
            return
        v = self.res.cpu(key, front)
        unit = "s/GiB" if sc.per_gib else "µs/req"
        fmt = (lambda x: f"{x:.2f} {unit}") if unit == "s/GiB" else (lambda x: f"{x:.0f} {unit}")
        self._add(label, v, f"<= {maximum:g} {unit}", lambda x: x <= maximum, fmt)

    def mib_at_most(self, label, key, value, maximum):
        if key not in self.res.scenarios:
            return
        self._add(label, value, f"<= {maximum:g} MiB", lambda x: x <= maximum,
                  lambda x: f"{x:.1f} MiB")

    def check(self, label, passed, detail):
        self.rows.append((label, detail, "same answer", "met" if passed else "NOT met"))

    def table(self):
        if not self.rows:
            return "  (no target's scenario ran)"
        w = max(len(r[0]) for r in self.rows)
        lines = [f"  {'target':<{w}}  {'measured':>14}  {'wanted':>16}  verdict"]
        for label, measured, wanted, verdict in self.rows:
            lines.append(f"  {label:<{w}}  {measured:>14}  {wanted:>16}  {verdict}")
        return "\n".join(lines)


def targets(results, checks, big_mib, have_apache):
    t = Targets(results)
    r = results
    t.ratio_at_least("stub GET c32: gate / nginx-ka req/s", "stub-get-c32", "gate", "nginx-ka", 1.3)
    t.cpu_at_most("stub GET c32: gate CPU per request", "stub-get-c32", "gate", 45)
    t.ratio_at_least("stub HTTP/2 16x4: gate / nginx-ka", "stub-h2", "gate", "nginx-ka", 1.5)
    t.ratio_at_least("full handshakes ECDSA: gate / nginx-ka", "hs-full-ecdsa", "gate", "nginx-ka", 1.3)
    t.ratio_at_least("full handshakes RSA: gate / nginx-ka", "hs-full-rsa", "gate", "nginx-ka", 1.3)
    t.ratio_at_least("auth c32 bcrypt 5: gate / nginx-ka", "auth-bcrypt5", "gate", "nginx-ka", 10)
    t.ratio_at_least("auth c32 bcrypt 10: gate / nginx-ka", "auth-bcrypt10", "gate", "nginx-ka", 10)
    if "wrong_password" in checks:
        gate, nginx = checks["wrong_password"]
        t.check("auth: wrong password answered like nginx", gate == nginx == 401,
                f"gate {gate}, nginx {nginx}")
    t.ratio_at_least(f"stub {big_mib} MiB download: gate / nginx-recipe", "stub-big", "gate",
                     "nginx-recipe", 1.5)
    t.cpu_at_most(f"stub {big_mib} MiB download: gate CPU per GiB", "stub-big", "gate", 1.5)
    t.ratio_at_least("stub 50 x 1 MiB: gate / nginx-recipe", "stub-50x1m", "gate", "nginx-recipe", 1.5)
    t.ratio_at_least("registry upstream GET c32: gate / direct", "registry-get-c32", "gate",
                     "direct", 0.95)
    t.ratio_at_least("registry upstream upload, monolithic: gate / direct", "upload-mono", "gate",
                     "direct", 0.95)
    t.ratio_at_least("registry upstream upload, 3 chunks: gate / direct", "upload-chunked", "gate",
                     "direct", 0.95)
    apache = "apache" if have_apache else "nginx-recipe"
    t.ratio_at_least(f"all-in-one GET c32: gate-aio / {apache}+registry", "registry-get-c32",
                     "gate-aio", apache, 15)
    t.ratio_at_least(f"all-in-one {big_mib} MiB download: gate-aio / registry-tls", "aio-big",
                     "gate-aio", "registry-tls", 1.0)
    t.cpu_at_most(f"all-in-one {big_mib} MiB download: gate-aio CPU per GiB", "aio-big",
                  "gate-aio", 1.0)
    t.ratio_at_least("all-in-one upload, monolithic: gate-aio / direct", "upload-mono",
                     "gate-aio", "direct", 2)
    t.ratio_at_least("all-in-one upload, 3 chunks: gate-aio / direct", "upload-chunked",
                     "gate-aio", "direct", 2)
    t.mib_at_most("memory: gate peak RSS, 50 parallel downloads", "stub-50x1m",
                  r.peak_rss_mib("stub-50x1m", "gate") if r.has("stub-50x1m", "gate") else None, 30)
    t.mib_at_most(f"memory: gate RSS growth during {big_mib} MiB download", "stub-big",
                  r.rss_growth_mib("stub-big", "gate") if r.has("stub-big", "gate") else None, 5)
    t.mib_at_most(f"memory: gate-aio RSS growth during {big_mib} MiB download", "aio-big",
                  r.rss_growth_mib("aio-big", "gate-aio") if r.has("aio-big", "gate-aio") else None, 5)
    return t
