"""What `reload` (the MQTT command) and SIGHUP do: new prompts, then the class profiles written meanwhile.

Contract: `reload_all(line)` loads the newest prompt checkpoint when the line watches one
([agent].prompt_dir or [model].checkpoint; `InspectionService.reload`), then re-reads every class's
profile from [model].profile_dir on the engine worker (`ClassRegistry.reload_profiles`, between
batches), so a profile `genclip calibrate --profiles` wrote while the agent runs is taken without a
restart. The answer is `{"prompt_version": ..., "profiles": [one entry per class whose profile changed
or was refused]}`; the change is logged and kept in the retained info (`profile_reload`). A refused
checkpoint still raises, after the profiles were re-read; with neither a checkpoint nor a profile
folder it raises as `InspectionService.reload` does ("no checkpoint to load").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent.commands import ENGINE_LOADING
from agent.logs import get_logger
from agent.results import JsonObject, iso

if TYPE_CHECKING:
    from agent.service import InspectionService

log = get_logger(__name__)
PROFILES_TIMEOUT_S = 300.0  # as long as a prompt reload may run on the worker before it counts as hung


def reload_all(line: InspectionService) -> JsonObject:
    """New prompts (when a checkpoint is watched), then the class profiles; the answer's fields."""
    config = line.config
    watched = config.agent.prompt_dir or config.model.checkpoint
    engine = line.worker.engine
    version = engine.prompt_version if engine is not None else "unknown"
    error: Exception | None = None
    if watched is not None or config.model.profile_dir is None:
        try:
            version = line.reload()
        except Exception as exc:
            error = exc
    changes = reload_profiles(line) if config.model.profile_dir is not None else []
    if error is not None:
        raise error
    return {"prompt_version": version, "profiles": changes}


def reload_profiles(line: InspectionService, timeout: float = PROFILES_TIMEOUT_S) -> list[JsonObject]:
    """Re-read the class profiles from [model].profile_dir on the worker; what changed (logged, in the info)."""
    if line.worker.engine is None:
        raise ValueError(ENGINE_LOADING)
    found = line.worker.submit(lambda engine: engine.classes.reload_profiles()).result(timeout)
    changes: list[JsonObject] = [change.as_dict() for change in found]
    log.info("class profiles re-read", folder=str(line.config.model.profile_dir), changes=changes)
    line.profile_reload = {"at": iso(datetime.now(UTC)), "changes": changes}
    line.publish_info()
    return changes
