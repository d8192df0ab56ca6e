"""A task no base model knows and a fine-tune learns: catalogue records in a house format.

A fictional shop writes its product listings freely ("Meet the Zentrix Aero 5: a teal blender, yours
for EUR 129.") and files each product as one record in a fixed format::

    Zentrix Aero 5 | blender | teal | 129 EUR

(name | category | colour | price in euros). Turning a listing into its record takes the shop's
format, which no model has seen: the field order, the separators, prices normalised from "€129",
"129 euros" or "EUR 129". A base model asked for "the catalogue record" writes prose; a fine-tune on
a few hundred records learns the format. That makes it a domain fine-tune whose task accuracy can
fall, which HotpotQA at 135M parameters cannot show (its accuracy is 5-9%).

The rows are generated deterministically (`generate`), shipped as ``bundled/data/catalog`` (written
for this project: Apache-2.0) and split like every benchmark. A response is correct when it contains
the record (`hcnr_jax.data.answers.contains_answer`: case and punctuation are ignored, so the
separators are not scored, the fields and their order are).
"""

from __future__ import annotations

import numpy as np

PROMPT = "Write the catalogue record for this listing.\nListing: {listing}"

_ONSETS = ("Z", "Kr", "V", "Tr", "Br", "L", "M", "Qu", "Sn", "F", "Gl", "P", "D", "H", "N", "St")
_VOWELS = ("a", "e", "i", "o", "u", "y", "ae", "io", "ou")
_CODAS = ("x", "n", "r", "l", "nt", "ck", "ss", "m", "v", "rk", "th", "z")
_LINES = ("Aero", "Nova", "Flux", "Prime", "Edge", "Orbit", "Pulse", "Terra", "Halo", "Vista", "Core", "Drift")
CATEGORIES = ("blender", "kettle", "desk lamp", "backpack", "water bottle", "wall clock", "toaster", "office chair",
              "rain jacket", "bicycle helmet", "coffee grinder", "bookshelf", "hand mixer", "floor fan", "yoga mat",
              "travel mug", "hair dryer", "garden hose", "tent", "power bank")
COLOURS = ("teal", "crimson", "olive", "navy", "amber", "ivory", "charcoal", "coral", "lilac", "mustard", "silver",
           "forest green", "sky blue", "burgundy", "sand", "plum")
_PRICES = ("EUR {p}", "€{p}", "{p} euros", "{p} EUR", "{p}.00 euros")
_TEMPLATES = (
    "Meet the {name}: a {colour} {category}, yours for {price}.",
    "The {name} is our new {category}. Colour: {colour}. Price: {price}.",
    "{price} buys you the {name}, a {category} finished in {colour}.",
    "Looking for a {category}? The {colour} {name} costs just {price}.",
    "New in store: {name} ({category}, {colour}) at {price}.",
    "In {colour}, the {name} {category} sells for {price}.",
    "Our {category} range grows: the {name}, available in {colour}, {price}.",
    "Price {price}. Product {name}. Type {category}. Finish {colour}.",
)


def _name(rng: np.random.Generator) -> str:
    word = "".join(rng.choice(a) for a in (_ONSETS, _VOWELS, _CODAS)) + str(rng.choice(("", "a", "o", "ix", "en")))
    return f"{word} {rng.choice(_LINES)} {int(rng.integers(2, 10))}"


def record(name: str, category: str, colour: str, price: int) -> str:
    """The house format: ``name | category | colour | price EUR``."""
    return f"{name} | {category} | {colour} | {price} EUR"


def generate(n: int = 3000, seed: int = 0) -> list[dict]:
    """``n`` listings with their records, deterministic in ``seed``; product names are unique.
    Rows: ``{"question": prompt with the listing, "answer": record}``."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    while len(rows) < n:
        name = _name(rng)
        if name in seen:
            continue
        seen.add(name)
        category, colour = str(rng.choice(CATEGORIES)), str(rng.choice(COLOURS))
        price = int(rng.integers(5, 400))
        listing = str(rng.choice(_TEMPLATES)).format(
            name=name, category=category, colour=colour, price=str(rng.choice(_PRICES)).format(p=price))
        rows.append({"question": PROMPT.format(listing=listing), "answer": record(name, category, colour, price)})
    return rows
