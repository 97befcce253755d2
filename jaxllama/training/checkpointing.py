"""Training checkpoints with orbax's CheckpointManager: state, data-loader state and metadata.

Each checkpoint step holds three items: `state` (TrainState: step, float32 params, optimizer
state; restored straight into the run's shardings), `data` (the grain iterator state, JSON) and
`meta` (the model config and the loss at that step, JSON). Saves are asynchronous (training goes
on while the previous step is written), every `every` steps plus forced saves at the end and on
SIGTERM/SIGINT; the last `keep` are kept. orbax writes each step into a temporary directory and
renames it when complete, so a save cut short is never listed; a listed step that fails to read
(a damaged file) is skipped with a warning and the previous step is tried.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _ocp():
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


class CheckpointManager:
    """A thin wrapper of `orbax.checkpoint.CheckpointManager` for the three training items."""

    def __init__(self, directory: str | Path, every: int = 100, keep: int = 3,
                 async_save: bool = True):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "data", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict,
             force: bool = False) -> bool:
        """Start saving `step` (asynchronously) when it is due or `force`; True if started."""
        ocp = _ocp()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        if force and step in self._mngr.all_steps():
            return False
        return self._mngr.save(step, args=args, force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable step, or None when there is
        none. `abstract_state`: ShapeDtypeStructs with shardings (the restore target)."""
        ocp = _ocp()
        for step in sorted(self._mngr.all_steps(), reverse=True):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
            try:
                out = self._mngr.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any damage: missing/truncated files, bad json
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                            self.directory, step, first)
                continue
            return step, out["state"], dict(out["data"]), dict(out["meta"])
        return None

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
