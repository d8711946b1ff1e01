"""The `[[cameras]]` entries: one frame source each, with the product class it sees."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from agent.section import Section


class CameraConfig(Section):
    id: str = Field(..., description="Camera id, unique on this line.")
    source: str = Field(..., description="Device index ('0'), URL (rtsp://, http://), video file, or image folder.")
    product_class: str = Field(..., description="What this camera sees, e.g. 'bottle' or 'pcb1'.")
    fps: float = Field(5.0, gt=0, le=1000, description="Frames per second to take.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", value):
            raise ValueError("must be letters, digits, '-' or '_'")
        return value

    @field_validator("product_class", "source")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()
