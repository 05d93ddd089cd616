"""Plain-data declarations of features and labels, shared by the loader and the model builders.

Nothing here imports torch. A :class:`FeatureSpec` is the single source from which both the
Arrow -> ``Batch`` parsing and the TorchRec ``EmbeddingBagConfig`` s are derived.

Shard layout (written by ``mptrec data convert`` / ``mptrec data synth``)::

    DIR/schema.json                    fields, labels, vocabulary sizes, row counts, sources
    DIR/train/part-00000.parquet ...   one folder per split
    DIR/valid/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

Column types in the shards: sparse single-valued fields are ``int64`` ids in
``[0, vocab_size)``; multi-valued fields are ``list<int64>``; dense fields are ``float32``; label
columns are ``int8`` / ``int64`` (0/1, or raw codes mapped through ``positive_values``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeatureKind = Literal["sparse", "dense"]
OovPolicy = Literal["error", "hash", "clip"]


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    Args:
        name: feature name; also the TorchRec feature key and the table name suffix.
        column: Parquet column it is read from (defaults to ``name``).
        kind: ``"sparse"`` (ids looked up in an embedding table) or ``"dense"`` (a float).
        num_embeddings: vocabulary size (rows of the table); sparse only.
        embedding_dim: embedding width; sparse only.
        multivalent: the column is ``list<int64>`` (pooled with ``pooling``).
        pooling: ``"sum"`` or ``"mean"`` for the EmbeddingBag.
    """

    name: str
    column: str = ""
    kind: FeatureKind = "sparse"
    num_embeddings: int = 0
    embedding_dim: int = 0
    multivalent: bool = False
    pooling: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        if not self.column:
            object.__setattr__(self, "column", self.name)
        if self.kind == "sparse" and (self.num_embeddings <= 0 or self.embedding_dim <= 0):
            raise ValueError(
                f"feature {self.name!r}: sparse features need num_embeddings > 0 and "
                f"embedding_dim > 0, got {self.num_embeddings} and {self.embedding_dim}"
            )

    @property
    def single_valued(self) -> bool:
        """A sparse feature with exactly one id per row (not a list)."""
        return self.kind == "sparse" and not self.multivalent


@dataclass(frozen=True)
class LabelSpec:
    """One binary label, read from a column.

    Args:
        name: task name (the key of ``Batch.labels``).
        column: Parquet column.
        positive_values: when empty the column must already hold 0/1; otherwise the label is
            1 where the column's value is in this set and 0 elsewhere (e.g. Ali-CCP field 301).
    """

    name: str
    column: str
    positive_values: tuple[int, ...] = ()


class DataError(ValueError):
    """Bad input data; the message names the file and, where known, the column, row group and value."""


# --------------------------------------------------------------------------------------------
# Per-dataset column lists
# --------------------------------------------------------------------------------------------

#: Ali-CCP single-valued fields, in declared order (AITM's 18 fields, with 301 last).
ALICCP_SINGLE_FIELDS: tuple[str, ...] = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129",
    "205", "206", "207", "216", "508", "509", "702", "853", "301",
)
#: Ali-CCP multi-valued fields (``list<int64>`` columns). ``210`` (intention node) has several
#: values in every row of the real PaddleRec ESMM sample (3 to 14), so it is a list field too.
ALICCP_MULTI_FIELDS: tuple[str, ...] = ("210", "109_14", "110_14", "127_14", "150_14")
#: Every Ali-CCP field in declared order.
ALICCP_FIELDS: tuple[str, ...] = ALICCP_SINGLE_FIELDS + ALICCP_MULTI_FIELDS
#: Ali-CCP label columns.
ALICCP_LABELS: tuple[str, ...] = ("click", "purchase")
#: Full-data vocabulary sizes (table rows, id 0 = missing/rare) from AITM's
#: ``process_public_dataset.py`` (../shared/data/README.md).
ALICCP_VOCAB_SIZES: dict[str, int] = {
    "101": 238_635, "121": 98, "122": 14, "124": 3, "125": 8, "126": 4, "127": 4, "128": 3,
    "129": 5, "205": 467_298, "206": 6_929, "207": 263_942, "216": 106_399, "508": 5_888,
    "509": 104_830, "702": 51_878, "853": 37_148, "301": 4,
}
#: Sizes AITM does not publish (it drops these fields); assumed equal to the field whose entities
#: the list holds: 109_14 categories (206), 110_14 shops (207), 127_14 brands (216); 210 and
#: 150_14 (intention nodes) are a guess of 100,000.
ALICCP_ASSUMED_VOCAB_SIZES: dict[str, int] = {
    "210": 100_000, "109_14": 6_929, "110_14": 263_942, "127_14": 106_399, "150_14": 100_000,
}

#: The 42 columns of the UCI Census-Income (KDD) line format, in file order.
CENSUS_COLUMNS: tuple[str, ...] = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
    "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex",
    "union_member", "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses",
    "stock_dividends", "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat",
    "det_hh_summ", "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same",
    "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father", "country_mother",
    "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits", "weeks_worked",
    "year", "income_50k",
)
#: The 29 categorical input fields (keras-mmoe's list; ``marital_stat`` is the T2 label source
#: and is not an input).
CENSUS_SPARSE: tuple[str, ...] = (
    "class_worker", "det_ind_code", "det_occ_code", "education", "hs_college", "major_ind_code",
    "major_occ_code", "race", "hisp_origin", "sex", "union_member", "unemp_reason",
    "full_or_part_emp", "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat",
    "det_hh_summ", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "vet_question",
)
#: The 11 dense input fields (min-max scaled on the training split); D_in = 11 + 29 * 4 = 127.
CENSUS_DENSE: tuple[str, ...] = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends",
    "instance_weight", "num_emp", "own_or_self", "vet_benefits", "weeks_worked", "year",
)
#: Census label columns (0/1) written by the converter.
CENSUS_LABELS: tuple[str, ...] = ("income", "marital", "education_label")
