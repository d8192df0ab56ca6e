"""The generated catalogue task: deterministic, shipped as generated, scored on the whole record."""

from hcnr_jax.data import answers, benchmarks, catalog
from hcnr_jax.embedded import BUNDLED_DATA
from hcnr_jax.eval.bundle import write_catalog


def test_shipped_catalogue_is_what_the_generator_writes(tmp_path):
    assert write_catalog(tmp_path) == 3000
    shipped = BUNDLED_DATA / "catalog" / "catalog.jsonl"
    assert (tmp_path / "catalog" / "catalog.jsonl").read_bytes() == shipped.read_bytes()


def test_rows_hold_their_record_and_split_into_enough_training_rows():
    rows = catalog.generate(500, seed=3)
    names = [r["answer"].split(" | ")[0] for r in rows]
    assert len(set(names)) == 500
    for r in rows:
        name, category, colour, price = r["answer"].split(" | ")
        assert name in r["question"] and category in r["question"] and colour in r["question"]
        assert price.endswith(" EUR") and price.removesuffix(" EUR") in r["question"]
    ds = benchmarks.load_benchmark("catalog")
    assert ds["split"].count("calibration") >= 500 and ds["split"].count("development") >= 128
    assert set(ds["unanswerable"]) == {-1} and all(len(a) == 1 for a in ds["answers"])


def test_scoring_needs_every_field_in_order():
    gold = ["Zorix Aero 5 | blender | teal | 129 EUR"]
    assert answers.contains_answer("Zorix Aero 5 | blender | teal | 129 EUR", gold)
    assert answers.contains_answer("Record: zorix aero 5 - blender - teal - 129 eur.", gold)  # separators not scored
    assert not answers.contains_answer("Zorix Aero 5 | teal | blender | 129 EUR", gold)  # order is
    assert not answers.contains_answer("The Zorix Aero 5 is a teal blender for 129 euros.", gold)
