#!/usr/bin/env python3
"""Write the example datasets shipped in ``examples/``.

Run ``python examples/make_examples.py``. Standard library only; a fixed seed makes every
run produce byte-identical files. Output paths are relative to this script's folder:

    extract/train.jsonl, val.jsonl, test.jsonl   structured extraction into JSON (chat format)
    extract/README.md
    repetitive.jsonl      Alpaca rows, ~90 % one instruction (shows the diversity warning)
    alpaca_small.json     a JSON array of varied Alpaca rows (input, system, history)
    preferences.jsonl     preference rows (prompt/chosen/rejected, some question/... aliases)
    kto.jsonl             KTO rows (instruction, output, kto_tag)
    small.csv             Alpaca rows as CSV
    general/general.jsonl short factual questions for a forgetting check
    prefer/*.jsonl        the preference example: SFT records, then pairs (correct JSON
                          preferred over a wrong field or chatter) for train/val/test
    bad/*.jsonl           deliberately broken files for documentation and tests
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

SEED = 20240611
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- writing helpers


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_text(path, "".join(_dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- extraction task

SYSTEM_PROMPT = (
    "Extract the order details as JSON with keys name, city, product, quantity, phone. "
    "Use null for missing values."
)

KEYS = ("name", "city", "product", "quantity", "phone")

# Paraphrased user-side instructions; half of the records carry one of them before the text.
INSTRUCTIONS = [
    "Pull out the details from this message:",
    "Turn this into JSON:",
    "Extract the order fields from the text below.",
    "Please parse this customer message.",
    "Give me the structured data for this note:",
    "Convert the following request to JSON.",
    "What are the order details here?",
    "Read this and fill in the fields:",
    "Can you extract name, city, product, quantity and phone?",
    "Here is a message from a customer. Extract the details.",
    "JSON for this one, please:",
    "Parse the order below.",
]

# Names grouped by culture: first names and family names are combined within a group.
NAMES = {
    "iberian": (
        ["Maria", "José", "Ana", "Tiago", "Inês", "Carlos", "Lucía", "Javier"],
        ["Lopez", "Martínez", "Silva", "Ferreira", "García", "Costa", "Ruiz"],
    ),
    "anglo": (
        ["Emma", "James", "Olivia", "Tom", "Hannah", "Michael", "Grace", "Daniel"],
        ["Smith", "Walker", "Bennett", "Hughes", "Carter", "Reynolds"],
    ),
    "irish": (
        ["Siobhán", "Ciarán", "Aoife", "Niamh", "Seán"],
        ["Murphy", "O'Brien", "Kelly", "Byrne"],
    ),
    "german": (
        ["Lukas", "Anna", "Jonas", "Lena", "Felix", "Sophie"],
        ["Müller", "Schmidt", "Becker", "Wagner", "Hoffmann"],
    ),
    "french": (
        ["Camille", "Louis", "Chloé", "Hugo", "Léa"],
        ["Dubois", "Moreau", "Laurent", "Girard"],
    ),
    "italian": (["Giulia", "Marco", "Francesca", "Luca"], ["Rossi", "Bianchi", "Romano", "Ricci"]),
    "nordic": (
        ["Lars", "Ingrid", "Erik", "Astrid", "Mikkel"],
        ["Eriksson", "Larsen", "Nilsson", "Andersen"],
    ),
    "slavic": (
        ["Olga", "Piotr", "Katarzyna", "Dmitri", "Ivana"],
        ["Petrova", "Nowak", "Kowalski", "Novak"],
    ),
    "japanese": (
        ["Aiko", "Haruto", "Yuki", "Ren", "Sakura"],
        ["Tanaka", "Sato", "Suzuki", "Watanabe"],
    ),
    "chinese": (["Wei", "Mei", "Jun", "Xiu", "Hao"], ["Chen", "Wang", "Li", "Zhang", "Liu"]),
    "korean": (["Ji-woo", "Min-jun", "Seo-yeon", "Hyun"], ["Kim", "Park", "Choi", "Lee"]),
    "indian": (
        ["Priya", "Arjun", "Ananya", "Rahul", "Kavya", "Vikram"],
        ["Sharma", "Patel", "Iyer", "Reddy", "Gupta"],
    ),
    "arabic": (
        ["Ahmed", "Fatima", "Omar", "Layla", "Youssef"],
        ["Hassan", "Haddad", "Mansour", "Khalil"],
    ),
    "west_african": (
        ["Chinedu", "Kwame", "Amara", "Ngozi", "Kofi", "Adaeze"],
        ["Okafor", "Mensah", "Adeyemi", "Boateng", "Okonkwo"],
    ),
    "east_african": (["Wanjiru", "Otieno", "Amani", "Zawadi"], ["Kamau", "Odhiambo", "Mwangi"]),
    "vietnamese": (["Linh", "Minh", "Thao", "Quang"], ["Nguyen", "Tran", "Pham", "Hoang"]),
    "turkish": (["Elif", "Emre", "Zeynep", "Burak"], ["Yılmaz", "Demir", "Kaya", "Şahin"]),
    "latin_american": (
        ["Valentina", "Mateo", "Camila", "Diego", "Sofía"],
        ["Hernández", "Gómez", "Souza", "Oliveira", "Rojas"],
    ),
}

# City -> phone style. Phones are copied verbatim into the answer.
CITIES = [
    ("Lisbon", "pt"), ("Porto", "pt"), ("Madrid", "es"), ("Barcelona", "es"), ("Seville", "es"),
    ("London", "uk"), ("Manchester", "uk"), ("Leeds", "uk"), ("Dublin", "ie"), ("Cork", "ie"),
    ("Berlin", "de"), ("Munich", "de"), ("Köln", "de"), ("Zürich", "ch"), ("Paris", "fr"),
    ("Lyon", "fr"), ("Marseille", "fr"), ("Rome", "it"), ("Milan", "it"), ("Amsterdam", "nl"),
    ("Stockholm", "se"), ("Malmö", "se"), ("Oslo", "no"), ("Warsaw", "pl"), ("Kraków", "pl"),
    ("Prague", "cz"), ("Istanbul", "tr"), ("Cairo", "eg"), ("Lagos", "ng"), ("Accra", "gh"),
    ("Nairobi", "ke"), ("Mumbai", "in"), ("Bengaluru", "in"), ("Tokyo", "jp"), ("Osaka", "jp"),
    ("Seoul", "kr"), ("Shanghai", "cn"), ("Hanoi", "vn"), ("Sydney", "au"), ("Melbourne", "au"),
    ("Toronto", "na"), ("Chicago", "na"), ("Austin", "na"), ("Boston", "na"),
    ("Mexico City", "mx"), ("São Paulo", "br"), ("Buenos Aires", "ar"), ("Bogotá", "co"),
]  # fmt: skip


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _phone(rng: random.Random, style: str) -> str:
    d = lambda n: _digits(rng, n)  # noqa: E731
    forms = {
        "pt": [f"+351 9{d(2)} {d(3)} {d(3)}", f"9{d(2)} {d(3)} {d(3)}"],
        "es": [f"+34 6{d(2)} {d(3)} {d(3)}", f"6{d(2)} {d(2)} {d(2)} {d(2)}"],
        "uk": [f"+44 7700 {d(6)}", f"07700 {d(6)}", f"+44 20 {d(4)} {d(4)}"],
        "ie": [f"+353 8{d(1)} {d(3)} {d(4)}", f"08{d(1)} {d(3)} {d(4)}"],
        "de": [f"+49 151 {d(8)}", f"0151 {d(8)}", f"+49 30 {d(7)}"],
        "ch": [f"+41 79 {d(3)} {d(2)} {d(2)}"],
        "fr": [
            f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
            f"06 {d(2)} {d(2)} {d(2)} {d(2)}",
            f"06{d(8)}",
        ],
        "it": [f"+39 3{d(2)} {d(3)} {d(4)}", f"3{d(2)} {d(7)}"],
        "nl": [f"+31 6 {d(8)}", f"06-{d(8)}"],
        "se": [f"+46 70 {d(3)} {d(2)} {d(2)}", f"070-{d(3)} {d(2)} {d(2)}"],
        "no": [f"+47 {d(3)} {d(2)} {d(3)}"],
        "pl": [f"+48 {d(3)} {d(3)} {d(3)}", f"{d(3)}-{d(3)}-{d(3)}"],
        "cz": [f"+420 {d(3)} {d(3)} {d(3)}"],
        "tr": [f"+90 5{d(2)} {d(3)} {d(2)} {d(2)}", f"05{d(2)} {d(3)} {d(4)}"],
        "eg": [f"+20 10 {d(4)} {d(4)}", f"010{d(8)}"],
        "ng": [f"+234 803 {d(3)} {d(4)}", f"0803 {d(3)} {d(4)}"],
        "gh": [f"+233 24 {d(3)} {d(4)}", f"024 {d(3)} {d(4)}"],
        "ke": [f"+254 7{d(2)} {d(3)} {d(3)}", f"07{d(2)} {d(6)}"],
        "in": [f"+91 9{d(4)} {d(5)}", f"9{d(9)}", f"+91-9{d(4)}-{d(5)}"],
        "jp": [f"+81 90-{d(4)}-{d(4)}", f"090-{d(4)}-{d(4)}"],
        "kr": [f"+82 10-{d(4)}-{d(4)}", f"010-{d(4)}-{d(4)}"],
        "cn": [f"+86 138 {d(4)} {d(4)}", f"138{d(8)}"],
        "vn": [f"+84 9{d(1)} {d(3)} {d(2)} {d(2)}", f"09{d(1)} {d(3)} {d(4)}"],
        "au": [f"+61 4{d(2)} {d(3)} {d(3)}", f"04{d(2)} {d(3)} {d(3)}"],
        "na": [f"({d(3)}) 555-{d(4)}", f"{d(3)}-555-{d(4)}", f"+1 {d(3)} 555 {d(4)}"],
        "mx": [f"+52 55 {d(4)} {d(4)}", f"55 {d(4)} {d(4)}"],
        "br": [f"+55 11 9{d(4)}-{d(4)}", f"(11) 9{d(4)}-{d(4)}"],
        "ar": [f"+54 9 11 {d(4)}-{d(4)}", f"11 {d(4)}-{d(4)}"],
        "co": [f"+57 3{d(2)} {d(3)} {d(4)}", f"3{d(2)} {d(7)}"],
    }
    return rng.choice(forms[style])


# (singular, plural) — the answer's "product" is the singular form.
PRODUCTS = [
    ("blue mug", "blue mugs"), ("ceramic teapot", "ceramic teapots"),
    ("desk lamp", "desk lamps"), ("wireless mouse", "wireless mice"),
    ("USB-C cable", "USB-C cables"), ("yoga mat", "yoga mats"),
    ("bag of coffee beans", "bags of coffee beans"), ("box of green tea", "boxes of green tea"),
    ("linen tablecloth", "linen tablecloths"), ("wool scarf", "wool scarves"),
    ("notebook", "notebooks"), ("fountain pen", "fountain pens"),
    ("water bottle", "water bottles"), ("phone case", "phone cases"),
    ("pair of running shoes", "pairs of running shoes"), ("cotton T-shirt", "cotton T-shirts"),
    ("laptop stand", "laptop stands"), ("mechanical keyboard", "mechanical keyboards"),
    ("bamboo cutting board", "bamboo cutting boards"), ("cast-iron pan", "cast-iron pans"),
    ("scented candle", "scented candles"), ("picture frame", "picture frames"),
    ("potted fern", "potted ferns"), ("bike helmet", "bike helmets"),
    ("rain jacket", "rain jackets"), ("backpack", "backpacks"),
    ("jar of honey", "jars of honey"), ("bottle of olive oil", "bottles of olive oil"),
    ("chess set", "chess sets"), ("jigsaw puzzle", "jigsaw puzzles"),
    ("bath towel", "bath towels"), ("pillow", "pillows"),
    ("LED bulb", "LED bulbs"), ("extension cord", "extension cords"),
    ("office chair", "office chairs"), ("wine glass", "wine glasses"),
    ("kids' raincoat", "kids' raincoats"), ("sketchbook", "sketchbooks"),
    ("set of paintbrushes", "sets of paintbrushes"), ("tennis racket", "tennis rackets"),
]  # fmt: skip

NUMBER_WORDS = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
    9: "nine", 10: "ten", 11: "eleven", 12: "twelve", 15: "fifteen", 20: "twenty",
}  # fmt: skip

WHEN = [
    "by Friday", "before the weekend", "next Tuesday", "by the end of the month", "as soon as possible",
    "before the 14th", "this week if possible", "for Monday morning", "before our event on Saturday",
    "within ten days", "by the 3rd", "early next week",
]  # fmt: skip

GREETINGS = ["Hi", "Hello", "Hey", "Good morning", "Good afternoon", "Dear team"]


def _quantity(rng: random.Random) -> tuple[int, str]:
    """Return (value, how the text writes it): digits, number words, "a dozen", "a"..."""
    r = rng.random()
    if r < 0.08:
        return 12, "a dozen"
    if r < 0.12:
        return 6, "half a dozen"
    if r < 0.17:
        return 2, "a couple of"
    if r < 0.27:
        return 1, rng.choice(["a", "one", "1"])
    if r < 0.57:
        n = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 20])
        return n, NUMBER_WORDS[n]
    n = rng.choice([2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 24, 25, 30, 40, 48, 50, 60, 75, 100])
    return n, str(n)


def _article(noun: str) -> str:
    if noun.startswith(("USB", "uni", "one")):
        return "a"
    return "an" if noun[0].lower() in "aeio" or noun.startswith(("LED", "honest")) else "a"


def _qty_phrase(qword: str, n: int, product: tuple[str, str]) -> str:
    noun = product[0] if n == 1 else product[1]
    if qword == "a":
        return f"{_article(noun)} {noun}"
    return f"{qword} {noun}"


# Each template: (text, needs). Placeholders:
#   {name} full name   {first} first name only   {city}   {qp} quantity + product phrase
#   {n} the quantity in digits   {prod} singular product   {prods} the noun matching {n}
#   {phone}   {when}   {greet}   {ref} an unrelated reference number (a distractor)
# The answer's name is {name} or {first}; fields a template does not mention are null.
TEMPLATES = [
    "{greet}, this is {name} from {city}. I'd like {qp} delivered {when}; call me on {phone}.",
    "{greet}, {name} here. Could you send {qp} to {city}? My number is {phone}.",
    "Please ship {qp} to {name} in {city}. Contact: {phone}.",
    "Order for {name} ({city}): {qp}. Phone {phone}.",
    "I need {qp} {when}. Name: {name}, city: {city}.",
    "Can I order {qp}? I'm in {city}. Thanks, {first}",
    "New order — {qp}, customer {name}, deliver to {city}, tel. {phone}",
    "{name} called from {city} and wants {qp}. Call back on {phone}.",
    "Contact note: spoke with {name} ({phone}). Interested in {qp}. Based in {city}.",
    "Ticket #{ref}: {name} in {city} received {qp} in bad condition and wants a replacement. Callback: {phone}.",
    "Support request from {name}: my parcel with {qp} never arrived in {city}. Order ref {ref}.",
    "Booking request: please reserve {qp} for pickup at the {city} store {when}. {name}, {phone}",
    "Could you put aside {qp} for me? I'll pick up at your {city} shop. – {first}",
    "Hello! We're a small café in {city} and want to order {qp}. Ask for {name} at {phone}.",
    "Quote needed: {qp}, delivery to {city} {when}.",
    "{first} from {city} again. Same as last time please: {qp}. Phone is still {phone}.",
    "Please add {qp} to my order. {name}",
    "Deliver to: {name}, {city}\nItems: {prods} x{n}\nPhone: {phone}",
    "Customer: {name} | City: {city} | Item: {prod} | Qty: {n}",
    "Item: {prod}\nQuantity: {n}\nShip to: {city}\nContact: {phone}",
    "Hey, I'm {first}. Any chance you could get {qp} to {city} {when}? Text me at {phone}.",
    "Voicemail from {phone}: caller wants {qp} and lives in {city}. Didn't leave a name.",
    "My name is {name} and I'd like to buy {qp}. Thank you!",
    "Re: order {ref} — {name} wants to change it to {qp}, same address in {city}.",
    "Gift order: {qp} for my sister in {city}. Sender: {name}, mobile {phone}.",
    "Is it possible to get {qp} {when}? I'm based in {city}. You can reach me on {phone}.",
    "Bulk request from {city}: {qp}. Please call {name} on {phone} to confirm.",
    "Note from the front desk: {name} stopped by and ordered {qp}. No phone given, lives in {city}.",
    "We'd like to order {qp} for our office in {city}. Contact person: {name}.",
    "Good day. Kindly dispatch {qp} {when}. Regards, {name} ({phone})",
    "{qp} please, to {city}. {name}, {phone}",
    "Returning customer {name} ({city}) asks for {qp} again. No phone on file.",
    "Pickup in {city}: {qp}, under the name {first}.",
    "Help! I ordered {qp} but got the wrong colour. {name}, {city}, {phone}",
    "Request: {qp}. Deliver {when}. Phone: {phone}. Name: {name}. City: {city}.",
    "SMS from {phone}: hi its {first}, pls send {qp} to {city} thx",
]


def _field_of(template: str) -> dict[str, bool]:
    return {
        "name": "{name}" in template or "{first}" in template,
        "city": "{city}" in template,
        "phone": "{phone}" in template,
    }


def _make_extract_text(rng: random.Random, template: str) -> tuple[str, dict]:
    """One message and its answer object."""
    culture = rng.choice(list(NAMES))
    firsts, lasts = NAMES[culture]
    first, last = rng.choice(firsts), rng.choice(lasts)
    full = f"{first} {last}"
    city, style = rng.choice(CITIES)
    product = rng.choice(PRODUCTS)
    n, qword = _quantity(rng)
    values = {
        "name": full,
        "first": first,
        "city": city,
        "qp": _qty_phrase(qword, n, product),
        "n": str(n),
        "prod": product[0],
        "prods": product[0] if n == 1 else product[1],
        "phone": _phone(rng, style),
        "when": rng.choice(WHEN),
        "greet": rng.choice(GREETINGS),
        "ref": str(rng.randint(10000, 99999)),
    }
    text = template.format(**values)
    if text[0].islower():  # a template that opens with the quantity phrase
        text = text[0].upper() + text[1:]
    has = _field_of(template)
    answer = {
        "name": (first if "{first}" in template else full) if has["name"] else None,
        "city": city if has["city"] else None,
        "product": product[0],
        "quantity": n,
        "phone": values["phone"] if has["phone"] else None,
    }
    assert tuple(answer) == KEYS
    return text, answer


def _chat_record(text: str, answer: dict, prefix: str | None) -> dict:
    user = text if prefix is None else f"{prefix}\n\n{text}"
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": _dumps(answer)},
        ]
    }


def make_extract(rng: random.Random) -> dict[str, list[dict]]:
    sizes = {"train": 400, "val": 50, "test": 100}
    total = sum(sizes.values())
    seen: set[str] = set()
    items: list[tuple[str, dict]] = []
    i = 0
    while len(items) < total:
        template = TEMPLATES[i % len(TEMPLATES)]  # every template used about equally
        i += 1
        text, answer = _make_extract_text(rng, template)
        if text in seen:
            continue
        seen.add(text)
        items.append((text, answer))
    rng.shuffle(items)
    splits: dict[str, list[dict]] = {}
    split_texts: dict[str, set[str]] = {}
    start = 0
    for name, size in sizes.items():
        part = items[start : start + size]
        start += size
        split_texts[name] = {text for text, _ in part}
        # Exactly half of each split (alternating) puts an instruction before the text.
        splits[name] = [
            _chat_record(text, answer, rng.choice(INSTRUCTIONS) if k % 2 else None)
            for k, (text, answer) in enumerate(part)
        ]
    names = list(sizes)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            shared = split_texts[names[a]] & split_texts[names[b]]
            if shared:
                sys.exit(f"error: {len(shared)} texts appear in both {names[a]} and {names[b]}")
    return splits


# --------------------------------------------------------------------------- preference task
# Built on the extraction task: the chosen answer is the correct JSON; the rejected one is a
# mistake a small model really makes after a short SFT (measured on SmolLM2-135M: most of its
# errors are a phone number or city left out as null, then a shortened name, a changed product
# or quantity), a value made up for a field that is not in the text, or the right JSON wrapped
# in chatter, which strict JSON equality scores wrong.

PREFER_SIZES = {"sft": 100, "train": 200}  # from extract/train.jsonl, in order, disjoint
# Both directions of the commonest mistake: a field that is there left out (SFT's habit), and
# a field that is not there made up — with only the first, DPO learns "null is wrong" and
# starts inventing phone numbers (measured: 16 of the SFT model's right answers broke that way).
MISTAKES = (("dropped", 0.3), ("invented", 0.2), ("name", 0.15), ("product", 0.1),
            ("quantity", 0.15), ("chatter", 0.1))  # fmt: skip
INVENTED = {"phone": ["000-000-0000", "+1 555 0100", "0000000000", "no phone given"],
            "city": ["London", "New York", "unknown"], "name": ["John Smith", "Customer", "unknown"]}  # fmt: skip


def _ramble(answer: dict, rng: random.Random) -> str:
    opening = rng.choice(["Sure! Here is the extracted information:", "Of course. The JSON is:",
                          "Here you go:", "I have extracted the details below."])  # fmt: skip
    closing = rng.choice(["Let me know if you need anything else!", "Hope this helps.",
                          "Is there anything else I can help with?", ""])  # fmt: skip
    return f"{opening}\n{_dumps(answer)}\n{closing}".strip()


def _mistake(answer: dict, kind: str, rng: random.Random) -> dict | None:
    """The answer with one mistake of ``kind``; None when that kind does not apply."""
    wrong = dict(answer)
    present = [k for k in ("phone", "city", "name") if answer[k] is not None]
    missing = [k for k in ("phone", "city", "name") if answer[k] is None]
    if kind == "dropped" and present:
        wrong[present[0] if rng.random() < 0.7 else rng.choice(present)] = None
    elif kind == "invented" and missing:
        field = missing[0] if rng.random() < 0.7 else rng.choice(missing)
        wrong[field] = rng.choice(INVENTED[field])
    elif kind == "name" and answer["name"]:
        first = answer["name"].split()[0]
        wrong["name"] = first if " " in answer["name"] else first[:-1] or None
    elif kind == "product":
        words = answer["product"].split()
        wrong["product"] = words[-1] + "s" if len(words) == 1 else " ".join(words[1:])
    elif kind == "quantity":
        q = answer["quantity"]
        wrong["quantity"] = rng.choice([q + 1, q * 10, 1]) if q != 1 else rng.choice([2, 10])
    return wrong if wrong != answer else None


def _pair(record: dict, rng: random.Random) -> dict:
    prompt = record["messages"][:-1]
    answer = json.loads(record["messages"][-1]["content"])
    kinds, weights = zip(*MISTAKES, strict=True)
    kind = rng.choices(kinds, weights)[0]
    wrong = (
        None
        if kind == "chatter"
        else _mistake(answer, kind, rng) or _mistake(answer, "dropped", rng)
    )
    rejected = _dumps(wrong) if wrong is not None else _ramble(answer, rng)
    return {"prompt": prompt, "chosen": _dumps(answer), "rejected": rejected}


def make_prefer(splits: dict[str, list[dict]], rng: random.Random) -> dict[str, list[dict]]:
    """sft.jsonl (chat records for the SFT stage), then preference pairs: train (from the
    extraction training records after those), val and test (from the extraction val and test)."""
    n_sft, n_train = PREFER_SIZES["sft"], PREFER_SIZES["train"]
    return {
        "sft": splits["train"][:n_sft],
        "train": [_pair(r, rng) for r in splits["train"][n_sft : n_sft + n_train]],
        "val": [_pair(r, rng) for r in splits["val"]],
        "test": [_pair(r, rng) for r in splits["test"]],
    }


EXTRACT_README = """\
# Example task: structured extraction into JSON

Each record is a short, natural-sounding customer message (an order, a contact note, a
booking request, a support ticket, an SMS...) and the answer is one compact JSON object with a
fixed schema, keys always in this order:

```json
{"name": "Maria Lopez", "city": "Lisbon", "product": "blue mug", "quantity": 3, "phone": "+351 912 345 678"}
```

| key        | type            | notes                                                          |
|------------|-----------------|----------------------------------------------------------------|
| `name`     | string or null  | as written (sometimes only a first name)                       |
| `city`     | string or null  | as written, including accents (`São Paulo`, `Malmö`)           |
| `product`  | string          | singular form (`3 wool scarves` -> `"wool scarf"`)             |
| `quantity` | integer         | digits or words: `two` -> 2, `a dozen` -> 12, `a couple of` -> 2 |
| `phone`    | string or null  | copied verbatim, whatever the format                           |

Missing fields are `null`. Answers are written with `json.dumps(obj, ensure_ascii=False)`
(default separators) and are scored by **strict JSON equality**: the model's reply must parse
as JSON and equal the reference object exactly (same keys, same values, same types).

Files (chat format, OpenAI-style JSONL; a fixed system prompt, user message, assistant answer):

| file          | records |
|---------------|---------|
| `train.jsonl` | 400     |
| `val.jsonl`   | 50      |
| `test.jsonl`  | 100     |

Why this task: a small instruct model such as SmolLM2-135M-Instruct gets the schema, the
`null`s, the singular product and the number words wrong zero-shot, but learns them within a
few hundred steps of fine-tuning, so the gain over a prompt baseline is easy to see.

How the files were made: `python examples/make_examples.py` (standard library only, fixed
seed, byte-identical on every run). Texts come from @TEMPLATES@ sentence templates (fields in
different orders, some fields left out), names from @CULTURES@ naming traditions, @CITIES@ cities with
country-specific phone formats, @PRODUCTS@ products and quantities written as digits or words. Half
of the user messages are the text alone; the other half start with one of @INSTRUCTIONS@ paraphrased
instructions ("Turn this into JSON:", ...), so no instruction or opening dominates. Every text
is unique, and the script fails if any text appears in two of the three files.
"""


# --------------------------------------------------------------------------- repetitive.jsonl

REVIEW_SUBJECTS = [
    "blender", "speaker", "phone charger", "hair dryer", "coffee maker", "backpack",
    "desk chair", "kettle", "umbrella", "water bottle", "toaster", "keyboard", "lamp", "jacket",
    "vacuum cleaner", "tent", "watch", "frying pan",
]  # fmt: skip
REVIEW_PHRASES = {
    "positive": [
        "The {s} works perfectly, very happy with it.",
        "Love this {s}! Great value for the price.",
        "Excellent {s}, arrived early and exceeded my expectations.",
        "Best {s} I've owned, would buy again.",
        "Really solid {s}. Five stars.",
        "My new {s} is fantastic, highly recommend.",
    ],
    "negative": [
        "The {s} broke after two days. Terrible.",
        "Do not buy this {s}, a complete waste of money.",
        "Very disappointed with the {s}, it stopped working within a week.",
        "The {s} arrived damaged and support never replied.",
        "Cheap, flimsy {s}. Returning it.",
        "Worst {s} I have ever bought.",
    ],
    "neutral": [
        "The {s} is okay, nothing special.",
        "It's an average {s}; does the job.",
        "The {s} arrived on time. Haven't used it much yet.",
        "Decent {s}, but there are better ones for the price.",
        "The {s} is as described, no more, no less.",
        "The {s} works fine, but it's a bit loud.",
    ],
}


def make_repetitive(rng: random.Random) -> list[dict]:
    same = "Classify the sentiment of this review."
    rows: list[dict] = []
    seen: set[str] = set()
    labels = ["positive", "negative", "neutral"]
    while len(rows) < 54:
        label = labels[len(rows) % 3]
        review = rng.choice(REVIEW_PHRASES[label]).format(s=rng.choice(REVIEW_SUBJECTS))
        if review in seen:
            continue
        seen.add(review)
        rows.append({"instruction": same, "input": review, "output": label})
    others = [
        {"instruction": "Is this review positive or negative?", "input": "The kettle leaks every time I use it.", "output": "negative"},
        {"instruction": "Summarise this review in three words.", "input": "The headphones sound great, are comfortable and the battery lasts all week.", "output": "Comfortable, great sound."},
        {"instruction": "What product is this review about?", "input": "The tent kept us dry during a storm, superb.", "output": "a tent"},
        {"instruction": "Rate this review from 1 to 5.", "input": "The toaster is fine, it toasts bread.", "output": "3"},
        {"instruction": "Translate this review into French.", "input": "I love this lamp.", "output": "J'adore cette lampe."},
        {"instruction": "Does the reviewer recommend the product? Answer yes or no.", "input": "Best watch I've owned, would buy again.", "output": "yes"},
    ]  # fmt: skip
    for k, row in enumerate(others):  # spread the odd ones through the file
        rows.insert(5 + k * 9, row)
    return rows


# --------------------------------------------------------------------------- alpaca_small.json

ALPACA_SMALL = [
    {"instruction": "What is the capital of Canada?", "input": "", "output": "The capital of Canada is Ottawa."},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The committee approved the new budget.", "output": "The new budget was approved by the committee."},
    {"instruction": "Compute the result.", "input": "17 × 6", "output": "102"},
    {"instruction": "Give three tips for falling asleep faster.", "output": "1. Keep a regular bedtime, even at weekends.\n2. Avoid screens for the last hour before bed.\n3. Keep the bedroom cool, dark and quiet."},
    {"instruction": "Translate into Spanish.", "input": "Where is the train station?", "output": "¿Dónde está la estación de tren?"},
    {"instruction": "Explain what photosynthesis is in one sentence.", "output": "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar and release oxygen."},
    {"instruction": "Make this sentence more formal.", "input": "Hey, can you send me the report asap?", "output": "Could you please send me the report at your earliest convenience?", "system": "You are an assistant that edits business emails."},
    {"instruction": "How many minutes are there in three and a half hours?", "output": "There are 210 minutes in three and a half hours (3.5 × 60 = 210)."},
    {"instruction": "Correct the spelling mistakes.", "input": "I recieved the pakage yesterday and it was definately worth the weight.", "output": "I received the package yesterday and it was definitely worth the wait."},
    {"instruction": "Name the largest planet in the Solar System.", "output": "Jupiter is the largest planet in the Solar System."},
    {"instruction": "Summarise the paragraph in one sentence.", "input": "The town library will close for renovation from 1 March to 30 April. During this time, books can be returned at the town hall, and a small mobile library will visit the market square every Saturday morning.", "output": "The library closes for renovation in March and April, with returns at the town hall and a mobile library on Saturday mornings."},
    {"instruction": "What is 15% of 240?", "output": "15% of 240 is 36."},
    {"instruction": "Classify each animal as a mammal, bird or reptile.", "input": "eagle, dolphin, lizard, bat", "output": "eagle: bird\ndolphin: mammal\nlizard: reptile\nbat: mammal"},
    {"instruction": "Write a haiku about autumn rain.", "output": "Cold rain on the roof,\nred leaves slide down the window,\nthe kettle murmurs.", "system": "You are a poet who writes short, concrete verse."},
    {"instruction": "Convert the temperature to Fahrenheit.", "input": "25 °C", "output": "25 °C is 77 °F."},
    {"instruction": "Who wrote the novel 'Pride and Prejudice'?", "output": "Jane Austen wrote 'Pride and Prejudice', published in 1813."},
    {"instruction": "Turn the list into a single sentence.", "input": "- buy milk\n- call the dentist\n- pay the electricity bill", "output": "I need to buy milk, call the dentist and pay the electricity bill."},
    {"instruction": "And what is that number doubled?", "output": "Doubled, it is 48.", "history": [["What is 8 times 3?", "8 times 3 is 24."]]},
    {"instruction": "Explain the difference between weather and climate.", "output": "Weather is the state of the atmosphere over hours or days; climate is the average pattern of weather in a region over many years."},
    {"instruction": "Shorten this sentence without changing its meaning.", "input": "Due to the fact that it was raining, we made the decision to stay at home.", "output": "Because it was raining, we decided to stay home."},
    {"instruction": "What is the boiling point of water at sea level in Celsius?", "output": "100 °C."},
    {"instruction": "Can you suggest a name for it?", "output": "How about \"Biscuit\"? It is short, friendly and easy to call out at the park.", "history": [["I just adopted a small brown puppy.", "Congratulations! Puppies bring a lot of joy. How can I help?"], ["I can't decide what to call him.", "Happy to help you choose. Do you prefer short names or longer ones?"]], "system": "You are a cheerful assistant."},
    {"instruction": "Solve for x.", "input": "3x + 7 = 22", "output": "x = 5"},
    {"instruction": "List the three primary colours of light.", "output": "Red, green and blue."},
    {"instruction": "Rewrite the text for a ten-year-old.", "input": "Vaccines train the immune system to recognise pathogens without causing the disease.", "output": "A vaccine teaches your body how to spot a germ, so it can fight it off later without you getting sick."},
    {"instruction": "How long does light from the Sun take to reach Earth?", "output": "About 8 minutes and 20 seconds."},
    {"instruction": "Now give the answer in kilometres.", "output": "42.195 kilometres.", "history": [["How long is a marathon in miles?", "A marathon is about 26.2 miles."]]},
    {"instruction": "Write a polite reply declining the invitation.", "input": "Would you like to join us for dinner on Friday?", "output": "Thank you so much for the invitation! Unfortunately I already have plans on Friday, but I hope we can get together another time.", "system": "You write short, warm replies."},
    {"instruction": "What is the square root of 144?", "output": "12"},
    {"instruction": "Give an antonym for each word.", "input": "ancient, generous, fragile", "output": "ancient: modern\ngenerous: stingy\nfragile: sturdy"},
]  # fmt: skip


# --------------------------------------------------------------------------- preferences, kto, csv

PREFERENCES = [
    {"prompt": "What is the capital of Australia?", "chosen": "The capital of Australia is Canberra.", "rejected": "The capital of Australia is Sydney."},
    {"prompt": "Explain recursion in one sentence.", "chosen": "Recursion is when a function solves a problem by calling itself on smaller versions of the same problem until it reaches a simple base case.", "rejected": "Recursion is recursion."},
    {"prompt": "How many legs does a spider have?", "chosen": "A spider has eight legs.", "rejected": "Spiders have six legs, like all insects."},
    {"prompt": "Write a one-line thank-you note to a colleague who covered my shift.", "chosen": "Thanks so much for covering my shift on Tuesday — I really owe you one!", "rejected": "ok thx"},
    {"prompt": "What is 12 × 12?", "chosen": "12 × 12 = 144.", "rejected": "12 × 12 = 124."},
    {"prompt": "Suggest a healthy breakfast.", "chosen": "Porridge with berries and a handful of nuts gives you fibre, protein and slow-release energy.", "rejected": "Skip breakfast and have three coffees instead."},
    {"prompt": "Translate 'good night' into German.", "chosen": "Gute Nacht.", "rejected": "Guten Morgen."},
    {"prompt": "Is it safe to look directly at the Sun?", "chosen": "No. Looking directly at the Sun can permanently damage your eyes; use certified eclipse glasses or a pinhole projector.", "rejected": "Yes, as long as you only do it for a minute or two."},
    {"prompt": "Summarise: 'The meeting is moved from Monday 10:00 to Tuesday 14:00 in room B.'", "chosen": "The meeting is now on Tuesday at 14:00 in room B.", "rejected": "There is a meeting."},
    {"prompt": "Name a prime number between 20 and 30.", "chosen": "23 (29 is another).", "rejected": "25."},
    {"prompt": "How do I reverse a list in Python?", "chosen": "Use `my_list.reverse()` to reverse it in place, or `my_list[::-1]` to get a reversed copy.", "rejected": "Python lists cannot be reversed."},
    {"prompt": "Give me a synonym for 'happy'.", "chosen": "Cheerful.", "rejected": "Sad."},
    {"prompt": "What causes the seasons on Earth?", "chosen": "The tilt of Earth's axis: as Earth orbits the Sun, each hemisphere takes turns leaning towards it and gets more direct sunlight.", "rejected": "Earth is closer to the Sun in summer and farther away in winter."},
    {"prompt": "Write a subject line for an email announcing a team lunch on Friday.", "chosen": "Team lunch this Friday at 12:30 — join us!", "rejected": "Email"},
    {"prompt": "How many days are in a leap year?", "chosen": "366.", "rejected": "365."},
    {"question": "What is the chemical symbol for gold?", "positive_answer": "Au.", "negative_answer": "Go."},
    {"question": "Recommend a way to remember a new password.", "positive_answer": "Use a password manager, or build a long passphrase from four unrelated words you can picture together.", "negative_answer": "Write it on a sticky note on your monitor."},
    {"question": "Who painted the Mona Lisa?", "positive_answer": "Leonardo da Vinci.", "negative_answer": "Vincent van Gogh."},
    {"question": "Convert 3 kilometres to metres.", "positive_answer": "3 kilometres is 3,000 metres.", "negative_answer": "3 kilometres is 300 metres."},
    {"question": "Reply politely to a customer whose order is late.", "positive_answer": "I'm sorry your order is late. I've checked with the courier and it will arrive tomorrow; I've refunded the shipping cost.", "negative_answer": "Not our problem, wait longer."},
]  # fmt: skip

KTO = [
    {"instruction": "What is the capital of Japan?", "output": "Tokyo.", "kto_tag": True},
    {"instruction": "What is the capital of Japan?", "output": "Kyoto.", "kto_tag": False},
    {"instruction": "What is 9 + 6?", "output": "15", "kto_tag": True},
    {"instruction": "What is 9 + 6?", "output": "14", "kto_tag": False},
    {"instruction": "Give a synonym for 'fast'.", "output": "Quick.", "kto_tag": True},
    {"instruction": "Give a synonym for 'fast'.", "output": "Slow.", "kto_tag": False},
    {"instruction": "Summarise in one sentence.", "input": "The park will be closed on Sunday for a marathon; it reopens on Monday at 7am.", "output": "The park is closed on Sunday for a marathon and reopens Monday at 7am.", "kto_tag": True},
    {"instruction": "Summarise in one sentence.", "input": "The park will be closed on Sunday for a marathon; it reopens on Monday at 7am.", "output": "Parks are nice.", "kto_tag": False},
    {"instruction": "Translate 'thank you' into Italian.", "output": "Grazie.", "kto_tag": True},
    {"instruction": "Translate 'thank you' into Italian.", "output": "Merci.", "kto_tag": False},
    {"instruction": "How many continents are there?", "output": "There are seven continents.", "kto_tag": True},
    {"instruction": "Which gas do plants absorb from the air?", "output": "Oxygen.", "kto_tag": False},
    {"instruction": "Write a friendly greeting for a new team member.", "output": "Welcome to the team! We're glad you're here — shout if you need anything.", "kto_tag": True},
    {"instruction": "Write a friendly greeting for a new team member.", "output": "Another one.", "kto_tag": False},
    {"instruction": "Correct the grammar.", "input": "She don't like apples.", "output": "She doesn't like apples.", "kto_tag": True},
    {"instruction": "Correct the grammar.", "input": "She don't like apples.", "output": "She don't likes apples.", "kto_tag": False},
    {"instruction": "What is the freezing point of water in Fahrenheit?", "output": "32 °F.", "kto_tag": True},
    {"instruction": "Name the longest river in Africa.", "output": "The Nile.", "kto_tag": True},
    {"instruction": "Name the longest river in Africa.", "output": "The Amazon.", "kto_tag": False},
    {"instruction": "Is a tomato a fruit or a vegetable, botanically?", "output": "Botanically, a tomato is a fruit.", "kto_tag": True},
]  # fmt: skip

SMALL_CSV = [
    ("What is the capital of Kenya?", "", "Nairobi."),
    ("Add the numbers.", "23 + 58", "81"),
    ("Rewrite in plain English.", "Please be advised that the premises will be inaccessible.", "The building will be closed."),
    ("Translate into French.", "I am hungry.", "J'ai faim."),
    ("Give the plural.", "mouse", "mice"),
    ("What colour do you get by mixing blue and yellow?", "", "Green."),
    ("Summarise in five words or fewer.", "The train was delayed by forty minutes because of a signal failure near the station.", "Train delayed by signal failure."),
    ("Name a mammal that can fly.", "", "The bat."),
    ("Convert to uppercase.", "hello, world", "HELLO, WORLD"),
    ("How many sides does a hexagon have?", "", "Six."),
    ("Fix the punctuation.", "lets eat grandma", "Let's eat, Grandma."),
    ("What is the opposite of 'early'?", "", "Late."),
    ("Multiply.", "14 × 5", "70"),
    ("Write a title for this note.", "Remember to water the plants, feed the cat, and lock the back door.", "House-sitting checklist"),
    ("Which planet is known as the Red Planet?", "", "Mars."),
    ("Extract the date.", "The invoice is due on 15 March 2025, please pay on time.", "15 March 2025"),
    ("Is the sentence a question or a statement?", "The shop opens at nine", "A statement."),
    ("What is the largest ocean?", "", "The Pacific Ocean."),
    ("Count the words.", "The quick brown fox jumps", "5"),
    ("Suggest a name for a bakery, with a comma-separated reason.", "", "Rise & Shine, because bread rises and it opens early."),
]  # fmt: skip


def _csv_text(rows: list[tuple[str, str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["instruction", "input", "output"])
    writer.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- general/general.jsonl

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Kenya", "Nairobi"),
    ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Peru", "Lima"),
]  # fmt: skip
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("day", "night"), ("light", "dark"), ("early", "late"), ("full", "empty"),
]  # fmt: skip
PLURALS = [
    ("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("foot", "feet"),
    ("city", "cities"), ("knife", "knives"), ("tooth", "teeth"), ("woman", "women"), ("sheep", "sheep"),
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# Added after the first 60 questions (which stay as they were, in order): more of the same kind,
# so that a 95 % interval can tell remedies apart. Every answer is one word, letter or number
# that a reply must contain as a whole word, and never a word of the question itself.
MORE_CAPITALS = [
    ("the United Kingdom", "London"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Ireland", "Dublin"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("the Czech Republic", "Prague"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Turkey", "Ankara"), ("the Philippines", "Manila"), ("Vietnam", "Hanoi"),
    ("Chile", "Santiago"), ("Venezuela", "Caracas"), ("Saudi Arabia", "Riyadh"),
    ("New Zealand", "Wellington"),
]  # fmt: skip
MORE_SUMS = 12  # small-number arithmetic, drawn after the first 14 sums
MORE_OPPOSITES = [
    ("left", "right"), ("true", "false"), ("black", "white"), ("wet", "dry"), ("push", "pull"),
    ("inside", "outside"), ("above", "below"), ("north", "south"), ("east", "west"),
    ("buy", "sell"), ("thick", "thin"), ("always", "never"), ("top", "bottom"), ("asleep", "awake"),
    ("rich", "poor"), ("remember", "forget"), ("deep", "shallow"), ("war", "peace"),
    ("alive", "dead"), ("wide", "narrow"),
]  # fmt: skip
MORE_PLURALS = [
    ("man", "men"), ("goose", "geese"), ("leaf", "leaves"), ("wolf", "wolves"), ("baby", "babies"),
    ("bus", "buses"), ("fox", "foxes"), ("potato", "potatoes"), ("ox", "oxen"), ("wife", "wives"),
    ("church", "churches"), ("story", "stories"), ("half", "halves"), ("shelf", "shelves"),
]  # fmt: skip
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
COUNTS = [
    ("How many legs does a spider have?", 8), ("How many legs does an insect have?", 6),
    ("How many legs does a dog have?", 4), ("How many legs does a chicken have?", 2),
    ("How many arms does an octopus have?", 8), ("How many days are there in a week?", 7),
    ("How many months are there in a year?", 12), ("How many hours are there in a day?", 24),
    ("How many minutes are there in an hour?", 60), ("How many seconds are there in a minute?", 60),
    ("How many days are there in a leap year?", 366),
    ("How many years are there in a century?", 100), ("How many years are there in a decade?", 10),
    ("How many sides does a triangle have?", 3), ("How many sides does a square have?", 4),
    ("How many sides does a hexagon have?", 6), ("How many wheels does a bicycle have?", 2),
    ("How many wheels does a tricycle have?", 3),
    ("How many letters are there in the English alphabet?", 26),
    ("How many centimetres are there in a metre?", 100),
]  # fmt: skip
COLOURS = [
    ("a ripe banana", "yellow"), ("grass", "green"), ("a clear daytime sky", "blue"),
    ("fresh snow", "white"), ("coal", "black"), ("a ripe tomato", "red"),
    ("a ripe lemon", "yellow"), ("milk", "white"), ("blood", "red"), ("an emerald", "green"),
    ("a ruby", "red"), ("a crow", "black"), ("a flamingo", "pink"), ("a carrot", "orange"),
]  # fmt: skip
YOUNG = [
    ("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("sheep", "lamb"), ("duck", "duckling"),
    ("frog", "tadpole"), ("goat", "kid"), ("bear", "cub"), ("kangaroo", "joey"), ("pig", "piglet"),
    ("goose", "gosling"), ("deer", "fawn"), ("chicken", "chick"),
]  # fmt: skip
SOUNDS = [
    ("a cow", "moo"), ("a duck", "quack"), ("a snake", "hiss"), ("a bee", "buzz"),
    ("an owl", "hoot"),
]  # fmt: skip
PAST_TENSES = [
    ("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"), ("take", "took"),
    ("write", "wrote"), ("swim", "swam"), ("sing", "sang"), ("drink", "drank"), ("buy", "bought"),
    ("think", "thought"), ("bring", "brought"), ("catch", "caught"), ("teach", "taught"),
    ("fly", "flew"), ("give", "gave"), ("know", "knew"), ("speak", "spoke"),
]  # fmt: skip
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTERS_AFTER = "BEGKMR"  # never asks for "A" or "I", which are everyday words too
LETTERS_BEFORE = "DPUZ"
FACTS = [
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the tallest animal in the world?", "giraffe"),
    ("What is the fastest land animal?", "cheetah"),
    ("What is the largest continent?", "Asia"),
    ("What is the highest mountain in the world?", "Everest"),
    ("What is the largest country in the world by area?", "Russia"),
    ("Which gas do humans need to breathe to stay alive?", "oxygen"),
    ("Which organ pumps blood around the body?", "heart"),
    ("What sweet food do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What is the currency of Japan?", "yen"),
]
LANGUAGES = [
    ("Brazil", "Portuguese"), ("France", "French"), ("Germany", "German"), ("Mexico", "Spanish"),
    ("Japan", "Japanese"), ("Italy", "Italian"), ("Russia", "Russian"),
]  # fmt: skip


def make_general(rng: random.Random) -> list[dict]:
    qa: list[tuple[str, str]] = []
    for country, capital in CAPITALS:
        qa.append((f"What is the capital of {country}? Answer with the city name only.", capital))
    pairs: set[tuple[str, int, int]] = set()
    qa += _sums(rng, pairs, 14, times=(2, 12), plus=((3, 60), (2, 40)))
    for word, opposite in OPPOSITES:
        qa.append((f'What is the opposite of "{word}"? Answer with one word.', opposite))
    for word, plural in PLURALS:
        qa.append((f'What is the plural of "{word}"? Answer with one word.', plural))
    for i, day in enumerate(DAYS):
        qa.append((f"What day comes after {day}? Answer with one word.", DAYS[(i + 1) % 7]))
    for i, day in enumerate(DAYS[:6]):
        qa.append((f"What day comes before {DAYS[i + 1]}? Answer with one word.", day))
    qa.extend(_more_general(rng, pairs))
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in qa
    ]


def _sums(rng, pairs, count, *, times, plus, strict=False) -> list[tuple[str, str]]:
    """``count`` new arithmetic questions (``pairs``: those drawn so far); ``strict``: no answer
    of 0 and none that appears in its question."""
    out, wanted = [], len(pairs) + count
    while len(pairs) < wanted:
        op = rng.choice(["+", "-", "×"])
        a, b = (
            (rng.randint(*times), rng.randint(*times))
            if op == "×"
            else (rng.randint(*plus[0]), rng.randint(*plus[1]))
        )
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b if op == "-" else a * b
        if (op, a, b) in pairs or (strict and result in (0, a, b)):
            continue
        pairs.add((op, a, b))
        out.append((f"What is {a} {op} {b}? Answer with the number only.", str(result)))
    return out


def _more_general(rng: random.Random, pairs: set[tuple[str, int, int]]) -> list[tuple[str, str]]:
    """The questions after the first 60; ``rng`` and ``pairs`` go on from the first 14 sums."""
    one_word = "Answer with one word."
    qa: list[tuple[str, str]] = []
    for country, capital in MORE_CAPITALS:
        qa.append((f"What is the capital of {country}? Answer with the city name only.", capital))
    # no "7 - 7", no answer in the question
    qa += _sums(rng, pairs, MORE_SUMS, times=(2, 9), plus=((1, 20), (1, 20)), strict=True)
    for word, opposite in MORE_OPPOSITES:
        qa.append((f'What is the opposite of "{word}"? {one_word}', opposite))
    for word, plural in MORE_PLURALS:
        qa.append((f'What is the plural of "{word}"? {one_word}', plural))
    for i, month in enumerate(MONTHS):
        qa.append((f"What month comes after {month}? {one_word}", MONTHS[(i + 1) % 12]))
    for i, month in enumerate(MONTHS[:11]):
        qa.append((f"What month comes before {MONTHS[i + 1]}? {one_word}", month))
    for question, number in COUNTS:
        qa.append((f"{question} Answer with the number only.", str(number)))
    for thing, colour in COLOURS:
        qa.append((f"What colour is {thing}? {one_word}", colour))
    for animal, young in YOUNG:
        qa.append((f"What is a baby {animal} called? {one_word}", young))
    for animal, sound in SOUNDS:
        qa.append((f"What sound does {animal} make? {one_word}", sound))
    for verb, past in PAST_TENSES:
        qa.append((f'What is the past tense of "{verb}"? {one_word}', past))
    for letter in LETTERS_AFTER:
        after = ALPHABET[ALPHABET.index(letter) + 1]
        qa.append(
            (f"What letter comes after {letter} in the alphabet? Answer with one letter.", after)
        )
    for letter in LETTERS_BEFORE:
        before = ALPHABET[ALPHABET.index(letter) - 1]
        qa.append(
            (f"What letter comes before {letter} in the alphabet? Answer with one letter.", before)
        )
    for question, answer in FACTS:
        qa.append((f"{question} {one_word}", answer))
    for country, language in LANGUAGES:
        qa.append((f"What language is mainly spoken in {country}? {one_word}", language))
    return qa


# --------------------------------------------------------------------------- bad/ files


def make_bad(folder: Path) -> None:
    def line(obj: dict) -> str:
        return _dumps(obj) + "\n"

    a1 = {"instruction": "What is 2 + 2?", "input": "", "output": "4"}
    a2 = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}
    a3 = {"instruction": "Translate 'cat' into Spanish.", "input": "", "output": "gato"}
    chat_ok = {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ]
    }

    # Line 3 is not valid JSON (missing closing brace).
    _write_text(
        folder / "malformed.jsonl",
        line(a1)
        + line(a2)
        + '{"instruction": "Broken row", "output": "no closing brace"\n'
        + line(a3),
    )
    # Line 2 misspells "output" as "ouput".
    _write_text(
        folder / "missing_field.jsonl",
        line(a1)
        + line({"instruction": "Name a fruit.", "input": "", "ouput": "Apple."})
        + line(a3),
    )
    # Line 2 uses role "bot".
    _write_text(
        folder / "bad_role.jsonl",
        line(chat_ok)
        + line(
            {
                "messages": [
                    {"role": "user", "content": "What is 3 + 4?"},
                    {"role": "bot", "content": "7"},
                ]
            }
        )
        + line(chat_ok),
    )
    # Line 1 ends with a user turn (nothing to train on).
    _write_text(
        folder / "ends_with_user.jsonl",
        line(
            {
                "messages": [
                    {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "What's the weather like?"},
                ]
            }
        )
        + line(chat_ok),
    )
    # Zero bytes.
    _write_bytes(folder / "empty.jsonl", b"")
    # Line 2 holds "café" encoded in Latin-1 (byte 0xE9): valid JSON, invalid UTF-8.
    latin = line(
        {"instruction": "Where can I get a coffee?", "input": "", "output": "At the café."}
    )
    _write_bytes(
        folder / "latin1.jsonl",
        line(a1).encode("utf-8") + latin.encode("latin-1") + line(a3).encode("utf-8"),
    )
    # Line 2 has kto_tag "maybe".
    _write_text(
        folder / "bad_kto.jsonl",
        line({"instruction": "What is 5 + 5?", "output": "10", "kto_tag": True})
        + line({"instruction": "What is 5 + 5?", "output": "11", "kto_tag": "maybe"})
        + line({"instruction": "What is 6 + 1?", "output": "7", "kto_tag": True}),
    )
    # Line 1 is a preference row without "rejected".
    _write_text(
        folder / "pref_missing.jsonl",
        line({"prompt": "What is the capital of Italy?", "chosen": "Rome."})
        + line({"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}),
    )
    # Valid: a UTF-8 byte-order mark and blank lines between three Alpaca rows.
    _write_bytes(
        folder / "bom_blank.jsonl",
        b"\xef\xbb\xbf" + (line(a1) + "\n" + line(a2) + "\n\n" + line(a3)).encode("utf-8"),
    )


# --------------------------------------------------------------------------- main


def main() -> None:
    rng = random.Random(SEED)
    splits = make_extract(random.Random(rng.randrange(2**32)))
    for name, rows in splits.items():
        _write_jsonl(HERE / "extract" / f"{name}.jsonl", rows)
    readme = EXTRACT_README
    for key, value in {
        "TEMPLATES": TEMPLATES,
        "CULTURES": NAMES,
        "CITIES": CITIES,
        "PRODUCTS": PRODUCTS,
        "INSTRUCTIONS": INSTRUCTIONS,
    }.items():
        readme = readme.replace(f"@{key}@", str(len(value)))
    _write_text(HERE / "extract" / "README.md", readme)
    _write_jsonl(HERE / "repetitive.jsonl", make_repetitive(random.Random(rng.randrange(2**32))))
    _write_text(
        HERE / "alpaca_small.json", json.dumps(ALPACA_SMALL, ensure_ascii=False, indent=2) + "\n"
    )
    _write_jsonl(HERE / "preferences.jsonl", PREFERENCES)
    _write_jsonl(HERE / "kto.jsonl", KTO)
    _write_text(HERE / "small.csv", _csv_text(SMALL_CSV))
    _write_jsonl(
        HERE / "general" / "general.jsonl", make_general(random.Random(rng.randrange(2**32)))
    )
    make_bad(HERE / "bad")
    for name, rows in make_prefer(splits, random.Random(rng.randrange(2**32))).items():
        _write_jsonl(HERE / "prefer" / f"{name}.jsonl", rows)
    print(f"wrote examples under {HERE}")


if __name__ == "__main__":
    main()
