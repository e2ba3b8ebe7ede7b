"""The building blocks of the config's models (proxy/config.py, proxy/route_options.py): a
strict, frozen base model, constrained numbers, and names safe as metric labels."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Seconds = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
# Names that become metric label values (routes, clients): short and printable.
LABEL_SAFE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
LABEL_SAFE_PROBLEM = "must be 1-64 characters of letters, digits, '_', '.', ':' or '-'"


class ConfigModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
