"""Column definitions of the Gaia DR3 tables, as the archive declares them.

The YAML files under ``schemas/`` were read off the ECSV headers of real
archive products (gaia_source, xp_continuous_mean_spectrum) and the DR3 data
model (rvs_mean_spectrum). Writers and readers take names, order and
datatypes from here so the formats cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import pyarrow as pa
import yaml

ECSV_TO_ARROW = {
    "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
    "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64(),
    "float32": pa.float32(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string(),
}


@dataclass(frozen=True)
class GaiaColumn:
    """One column as the archive declares it: name, ECSV datatype and array subtype, unit, description, UCD."""

    name: str
    datatype: str
    subtype: str | None = None
    unit: str | None = None
    description: str | None = None
    ucd: str | None = None

    @property
    def is_array(self) -> bool:
        """Whether the column is an array (ECSV: a string with a ``[...]`` subtype)."""
        return self.subtype is not None and "[" in self.subtype

    @property
    def arrow_type(self) -> pa.DataType:
        """The Arrow type readers convert the column to (a list for arrays)."""
        if self.is_array:
            return pa.list_(ECSV_TO_ARROW[self.subtype.split("[")[0]])
        return ECSV_TO_ARROW[self.datatype]

    def header_entry(self) -> dict:
        """The column's entry in an ECSV header's ``datatype`` list."""
        entry: dict = {"name": self.name, "datatype": self.datatype}
        if self.subtype:
            entry["subtype"] = self.subtype
        if self.unit:
            entry["unit"] = self.unit
        if self.description:
            entry["description"] = self.description
        if self.ucd:
            entry["meta"] = {"ucd": self.ucd}
        return entry


@dataclass(frozen=True)
class GaiaTable:
    """A Gaia DR3 table's columns, in archive order."""

    name: str
    columns: tuple[GaiaColumn, ...]

    @property
    def names(self) -> list[str]:
        """Column names in archive order."""
        return [c.name for c in self.columns]

    def column(self, name: str) -> GaiaColumn:
        """The column named ``name``; KeyError when the table has none."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}")

    def arrow_schema(self) -> pa.Schema:
        """The table's Arrow schema, from each column's :attr:`GaiaColumn.arrow_type`."""
        return pa.schema([pa.field(c.name, c.arrow_type) for c in self.columns])


@lru_cache(maxsize=None)
def gaia_table(name: str) -> GaiaTable:
    """``gaia_source``, ``xp_continuous_mean_spectrum`` or ``rvs_mean_spectrum``."""
    text = resources.files("stellar.io").joinpath("schemas", f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    cols = tuple(
        GaiaColumn(c["name"], c["datatype"], c.get("subtype"), c.get("unit"), c.get("description"), c.get("ucd"))
        for c in data["columns"]
    )
    return GaiaTable(data["table"], cols)
