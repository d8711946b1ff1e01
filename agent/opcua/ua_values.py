"""asyncua's NodeId, StatusCode and DataValue built from plain Python values.

asyncua types their arguments with its own NewTypes (Int16, String, UInt32, DateTime), so plain values do
not type-check although they are what it expects at run time; these helpers are the one place that says so.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from asyncua import ua


def node_id(identifier: str | int, namespace: int = 0) -> ua.NodeId:
    """A string node id in `namespace`, or a numeric one (ua.ObjectIds) in namespace 0."""
    return ua.NodeId(cast(Any, identifier), cast(Any, namespace))


def status(code: int) -> ua.StatusCode:
    """A status code from ua.StatusCodes."""
    return ua.StatusCode(cast(Any, code))


def data_value(value: object, variant: ua.VariantType, at: datetime) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, variant), SourceTimestamp=cast(Any, at))
