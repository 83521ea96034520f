"""``kubetune sweep FILE --local``: the trials of a FineTuneSweep manifest, one after another."""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune_trainer.search.local import RESULTS_TABLE, TrialResult, format_line, table_cells, table_header

log = logging.getLogger("kubetune")


def run_sweep(path: Path, *, output_dir: Path | None = None, max_trials: int | None = None) -> int:
    """Run the sweep; print each trial as it finishes, then the results best first. Exit 1 when no
    trial finished."""
    from tqdm.auto import tqdm

    from kubetune_trainer.search.manifest import ManifestSearch, load_sweep

    data = load_sweep(path)
    parallelism = data["spec"].get("parallelism", 1)
    if parallelism > 1:
        log.info("parallelism %d applies on a cluster; locally the trials run one after another", parallelism)
    widths: list[int] = []

    def on_trial(result: TrialResult) -> None:
        header = table_header(search.objective, paths)
        if not widths:  # fixed widths, so the rows printed one by one line up
            widths.extend(max(len(h), 10) for h in header)
            tqdm.write(format_line(header, widths))
        tqdm.write(format_line(table_cells(result, paths), widths))

    search = ManifestSearch(
        data,
        base_dir=path.parent,
        output_dir=output_dir,
        max_trials=max_trials,
        on_trial=on_trial,
        source=str(path),
    )
    paths = [p.path for p in search.parameters]
    search.run()
    print(f"\nresults, best first ({search.output_dir / RESULTS_TABLE}):")
    print(search.table())
    best = search.best
    if best is None:
        print("no trial finished: see the errors in results.json")
        return 1
    params = ", ".join(f"{k}={v}" for k, v in best.params.items())
    print(
        f"\nbest: {best.name} {search.objective}={best.objective:.4g} ({params})\nadapter: {best.output_dir}"
    )
    return 0
