"""An H&M-like synthetic dataset with planted, documented taste structure.

    python -m data.synth                      # tiny preset (tests)
    python -m data.synth data=small           # the demo
    python -m data.synth data=hm_scale        # H&M's exact size: 31,788,324 transactions

Same schema as the real data (data/schema.py). What the generator plants, so that models and tests
can find it:

* **Styles.** ``n_styles`` latent taste clusters. Every article belongs to exactly one style, and its
  style fixes its ``section_no``/``section_name``, its ``index_group``/``index``, the product types it
  can have, a colour bias and three signature words used in ``prod_name`` and ``detail_desc``.
* **Customer attributes -> style.** Each style has a target age ``age_mu``. A customer's *primary*
  style is drawn with probability proportional to ``exp(-(age - age_mu)^2 / (2 * 5^2))`` (uniform when
  age is null), and styles flagged "trend" get twice the weight for customers whose
  ``fashion_news_frequency`` is ``Regularly``. So age (and news frequency) predict the primary style.
* **History -> style.** Each customer also has a *secondary* style drawn uniformly, invisible in their
  attributes: only their purchase history reveals it.
* **Purchases.** Customers visit with heavy-tailed (lognormal) activity; a visit buys a geometric
  number of items (mean ``basket_mean``) and is about the primary style, or the secondary one with
  probability ``secondary_style_share``. Each item is, in order of precedence:
  a repurchase of one of the customer's last 8 articles with probability ``repurchase_rate`` (when they
  have any), else an article of the visit's style with probability ``style_affinity``, else an article
  drawn from the whole catalogue. Within a style or the catalogue, articles are drawn by their weight
  for that week.
* **Popularity.** An article's weight in week ``t`` is ``base * life(t) * season(t)``: base is
  lognormal (``popularity_sigma``), so popularity is heavy-tailed; life is zero before its launch week
  and decays exponentially after it (mean ``lifetime_weeks``; 20% of articles are long-lived basics);
  ``seasonal_share`` of articles peak in summer or in winter. Weekly volume follows the season too.
* **Prices.** Per-article base price by product type, 20% of sales at a 20-50% discount, 2% noise.
* **Channels.** Each customer has an online propensity (mean ``online_share``); 2 = online, 1 = store.

The truth behind the plant (customer styles, article styles) is written to ``<root>/_truth/`` for
tests and analysis; no pipeline stage reads it.

Deterministic given ``seed``: each week draws from its own generator seeded by (seed, week), so the
output does not depend on how the work is chunked. Memory is bounded by one week of transactions plus
per-customer state (an 8-slot ring of recent purchases), so hm_scale runs in a few GB.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from data import config as _config  # noqa: F401  (registers the structured configs)
from data.config import SynthConfig
from data.io import ShardWriter, join, table_url, write_json, write_parquet
from data.runinfo import peak_rss_mb, progress_bar, start_run
from data.schema import ARTICLES, CUSTOMERS, TRANSACTIONS
from data.staging import staged

log = logging.getLogger(__name__)

RING = 8  # recent purchases remembered per customer, the pool repurchases come from
AGE_SPREAD = 5.0

# (product_type_no, product_type_name, product_group_name, garment_group_no, garment_group_name, price level)
PRODUCT_TYPES = [
    (253, "Vest top", "Garment Upper body", 1002, "Jersey Basic", 0.6),
    (255, "T-shirt", "Garment Upper body", 1005, "Jersey Fancy", 0.7),
    (252, "Sweater", "Garment Upper body", 1003, "Knitwear", 1.4),
    (254, "Top", "Garment Upper body", 1005, "Jersey Fancy", 0.8),
    (259, "Shirt", "Garment Upper body", 1011, "Shirts", 1.2),
    (306, "Bra", "Underwear", 1017, "Under-, Nightwear", 0.7),
    (304, "Underwear bottom", "Underwear", 1017, "Under-, Nightwear", 0.4),
    (272, "Trousers", "Garment Lower body", 1009, "Trousers", 1.3),
    (274, "Shorts", "Garment Lower body", 1025, "Shorts", 0.9),
    (275, "Skirt", "Garment Lower body", 1012, "Skirts", 1.0),
    (265, "Dress", "Garment Full body", 1013, "Dresses Ladies", 1.5),
    (267, "Jumpsuit/Playsuit", "Garment Full body", 1013, "Dresses Ladies", 1.4),
    (264, "Jacket", "Garment Upper body", 1007, "Outdoor", 2.2),
    (262, "Coat", "Garment Upper body", 1007, "Outdoor", 2.8),
    (245, "Blazer", "Garment Upper body", 1008, "Blouses", 1.9),
    (298, "Swimwear bottom", "Swimwear", 1018, "Swimwear", 0.6),
    (286, "Bikini top", "Swimwear", 1018, "Swimwear", 0.7),
    (302, "Socks", "Socks & Tights", 1021, "Socks and Tights", 0.3),
    (273, "Leggings/Tights", "Garment Lower body", 1021, "Socks and Tights", 0.5),
    (87, "Boots", "Shoes", 1020, "Shoes", 2.0),
    (88, "Sneakers", "Shoes", 1020, "Shoes", 1.6),
    (66, "Earring", "Accessories", 1019, "Accessories", 0.3),
    (67, "Bag", "Accessories", 1019, "Accessories", 1.0),
    (72, "Hat/beanie", "Accessories", 1019, "Accessories", 0.4),
    (308, "Pyjama set", "Nightwear", 1017, "Under-, Nightwear", 0.9),
    (58, "Sunglasses", "Accessories", 1019, "Accessories", 0.5),
]

# (index_code, index_name, index_group_no, index_group_name)
INDEXES = [
    ("A", "Ladieswear", 1, "Ladieswear"),
    ("B", "Lingeries/Tights", 1, "Ladieswear"),
    ("C", "Ladies Accessories", 1, "Ladieswear"),
    ("D", "Divided", 2, "Divided"),
    ("F", "Menswear", 3, "Menswear"),
    ("G", "Baby Sizes 50-98", 4, "Baby/Children"),
    ("H", "Children Sizes 92-140", 4, "Baby/Children"),
    ("I", "Children Sizes 134-170", 4, "Baby/Children"),
    ("J", "Children Accessories, Swimwear", 4, "Baby/Children"),
    ("S", "Sport", 26, "Sport"),
]

SECTION_SUFFIXES = [
    "Everyday Collection", "Trend", "Basics", "Casual", "Premium", "Projects", "Essentials", "Edition",
    "Tailoring", "Denim", "Outerwear", "Nightwear", "Swimwear", "Shoes", "Accessories", "Smart",
]

# (colour_group_code, colour_group_name, perceived_colour_value_id, value name, master id, master name)
COLOURS = [
    (9, "Black", 4, "Dark", 5, "Black"), (10, "White", 3, "Light", 9, "White"),
    (73, "Dark Blue", 4, "Dark", 2, "Blue"), (72, "Blue", 2, "Medium Dusty", 2, "Blue"),
    (71, "Light Blue", 3, "Light", 2, "Blue"), (13, "Beige", 1, "Dusty Light", 11, "Beige"),
    (7, "Grey", 2, "Medium Dusty", 12, "Grey"), (6, "Light Grey", 3, "Light", 12, "Grey"),
    (52, "Pink", 1, "Dusty Light", 4, "Pink"), (51, "Light Pink", 3, "Light", 4, "Pink"),
    (42, "Red", 5, "Bright", 18, "Red"), (43, "Dark Red", 4, "Dark", 18, "Red"),
    (19, "Greenish Khaki", 2, "Medium Dusty", 20, "Khaki green"), (17, "Yellowish Brown", 2, "Medium Dusty", 15, "Mole"),
    (23, "Dark Yellow", 5, "Bright", 8, "Yellow"), (53, "Dark Pink", 4, "Dark", 4, "Pink"),
    (62, "Turquoise", 5, "Bright", 21, "Turquoise"), (33, "Orange", 5, "Bright", 7, "Orange"),
    (11, "Off White", 3, "Light", 9, "White"), (93, "Dark Green", 4, "Dark", 19, "Green"),
]

APPEARANCES = [
    (1010016, "Solid"), (1010001, "All over pattern"), (1010017, "Stripe"), (1010010, "Melange"),
    (1010008, "Front print"), (1010004, "Check"), (1010014, "Placement print"), (1010002, "Application/3D"),
    (1010019, "Denim"), (1010021, "Lace"),
]

WORDS = [
    "soft", "ribbed", "oversized", "fitted", "relaxed", "cropped", "linen", "cotton", "denim", "jersey",
    "satin", "wool", "chiffon", "fleece", "velour", "seamless", "padded", "pleated", "wrap", "tie-belt",
    "ruffled", "lace", "mesh", "quilted", "corduroy", "twill", "organic", "recycled", "stretch", "printed",
    "glossy", "brushed", "washed", "ribbed-knit", "puff-sleeved", "smocked", "tiered", "sporty", "airy",
    "flared", "slim", "wide", "high-waisted", "boxy", "cosy", "sheer", "tailored", "chunky",
]
FEATURES = [
    "with a round neckline", "with long sleeves", "with short sleeves", "with an elasticated waist",
    "with side pockets", "with a concealed zip", "with buttons down the front", "with a V-neck",
    "with adjustable straps", "with a drawstring hem", "with a collar", "with a relaxed fit",
]

WEEK_RNG_SALT = 1_000_003


def hex_ids(rng: np.random.Generator, n: int, nbytes: int = 32) -> pa.StringArray:
    """``n`` random lowercase hex strings of ``2*nbytes`` characters, built without per-row Python."""
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((n, 2 * nbytes), dtype=np.uint8)
    out[:, 0::2] = digits[raw >> 4]
    out[:, 1::2] = digits[raw & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * (2 * nbytes)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def _pick(table: list[tuple], idx: np.ndarray, field: int, type_: pa.DataType) -> pa.Array:
    values = pa.array([row[field] for row in table], type=type_)
    return values.take(pa.array(idx))


def _sample(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """n draws from a categorical distribution by inverse CDF (vectorised, any size)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    return np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(0, len(probs) - 1)


class Styles:
    """The latent taste clusters and the article attributes each one fixes."""

    def __init__(self, rng: np.random.Generator, n: int):
        self.n = n
        self.age_mu = np.sort(rng.uniform(17, 68, n))
        self.trend = rng.random(n) < 0.3
        # Index follows target age: young -> Divided/Sport, family age -> children, older -> Ladies/Men.
        young = [3, 9, 0, 1]
        family = [5, 6, 7, 8, 0, 4]
        older = [0, 1, 2, 4]
        self.index = np.array([
            rng.choice(young if mu < 27 else family if mu < 42 and rng.random() < 0.5 else older)
            for mu in self.age_mu  # n_styles is small (<= ~60): per-style Python is fine here
        ])
        self.section_no = np.arange(n) + 2 * (np.arange(n) // 2) + 10
        # Section names read like H&M's ("Divided Basics") and are unique per style.
        self.section_name = [f"{INDEXES[self.index[k]][1]} {SECTION_SUFFIXES[k % len(SECTION_SUFFIXES)]}"
                             + (f" {k // len(SECTION_SUFFIXES) + 1}" if k >= len(SECTION_SUFFIXES) else "")
                             for k in range(n)]
        self.product_types = [rng.choice(len(PRODUCT_TYPES), size=6, replace=False) for _ in range(n)]
        self.colours = [rng.choice(len(COLOURS), size=4, replace=False) for _ in range(n)]
        self.words = [rng.choice(len(WORDS), size=3, replace=False) for _ in range(n)]
        self.price_level = rng.lognormal(0.0, 0.25, n)

    def primary_weights(self, age: np.ndarray, news_regular: np.ndarray) -> np.ndarray:
        """(customers, styles) unnormalised p(primary style | age, news frequency): uniform without an age."""
        w = np.exp(-((age[:, None] - self.age_mu[None, :]) ** 2) / (2 * AGE_SPREAD ** 2))
        w[np.isnan(age)] = 1.0
        w = w * np.where(news_regular[:, None] & self.trend[None, :], 2.0, 1.0)
        w += 1e-9
        return w

    def primary_for(self, rng: np.random.Generator, age: np.ndarray, news_regular: np.ndarray) -> np.ndarray:
        """Draws each customer's primary style from p(style | age, news frequency); vectorised in blocks."""
        out = np.empty(len(age), dtype=np.int32)
        for lo in range(0, len(age), 200_000):
            a = age[lo:lo + 200_000]
            cdf = np.cumsum(self.primary_weights(a, news_regular[lo:lo + 200_000]), axis=1)
            u = rng.random(len(a))[:, None] * cdf[:, -1:]
            out[lo:lo + len(a)] = (cdf < u).sum(axis=1).clip(0, self.n - 1)
        return out


def make_customers(cfg: SynthConfig, rng: np.random.Generator, styles: Styles) -> tuple[pa.Table, dict]:
    n = cfg.n_customers
    ids = hex_ids(rng, n)
    young = rng.random(n) < 0.55
    age = np.where(young, rng.normal(24, 4, n), rng.normal(50, 10, n)).round().clip(16, 99)
    age[rng.random(n) < 0.01] = np.nan
    club = _sample(rng, np.array([0.93, 0.067, 0.0004, 0.0026]), n)
    news = _sample(rng, np.array([0.64, 0.35, 0.0006, 0.0094]), n)
    news_regular = news == 1
    fn = np.where(news_regular | (rng.random(n) < 0.02), 1.0, np.nan).astype(np.float32)
    active = np.where(~np.isnan(fn) & (rng.random(n) < 0.97), 1.0, np.nan).astype(np.float32)
    n_codes = max(10, n // 4)
    codes = hex_ids(rng, n_codes)
    code_idx = _sample(rng, 1.0 / np.arange(1, n_codes + 1) ** 0.6, n)  # a few very common codes

    def categorical(values: list, idx: np.ndarray) -> pa.Array:
        return pa.array(values, type=pa.string()).take(pa.array(idx))

    table = pa.table({
        "customer_id": ids,
        "FN": pa.array(fn, from_pandas=True),
        "Active": pa.array(active, from_pandas=True),
        "club_member_status": categorical(["ACTIVE", "PRE-CREATE", "LEFT CLUB", None], club),
        "fashion_news_frequency": categorical(["NONE", "Regularly", "Monthly", None], news),
        "age": pa.array(age, from_pandas=True).cast(pa.int16()),
        "postal_code": codes.take(pa.array(code_idx)),
    }).cast(CUSTOMERS.schema)
    state = {
        "activity": rng.lognormal(0.0, cfg.activity_sigma, n),
        "online": rng.beta(cfg.online_share * 4, (1 - cfg.online_share) * 4, n),
        "primary": styles.primary_for(rng, age, news_regular),
        "secondary": rng.integers(0, styles.n, n).astype(np.int32),
    }
    return table, state


def make_articles(cfg: SynthConfig, rng: np.random.Generator, styles: Styles) -> tuple[pa.Table, dict]:
    n = cfg.n_articles
    # Products with 1+ colour variants; article_id = product_code * 1000 + variant, as in H&M.
    variants = 1 + rng.poisson(1.3, n)
    n_products = int(np.searchsorted(np.cumsum(variants), n)) + 1
    variants = variants[:n_products]
    variants[-1] -= variants.sum() - n
    product_code = np.sort(rng.choice(np.arange(108_775, 959_462), n_products, replace=False))
    product_style = rng.integers(0, styles.n, n_products)
    product_style[: min(styles.n, n_products)] = rng.permutation(styles.n)[:n_products]  # no empty style
    product_ptype_slot = rng.integers(0, 6, n_products)
    product_word = rng.integers(0, 3, n_products)

    art_product = np.repeat(np.arange(n_products), variants)
    variant_no = np.arange(n) - np.repeat(np.cumsum(variants) - variants, variants) + 1
    style = product_style[art_product]
    ptype = np.array([styles.product_types[s][k] for s, k in
                      zip(product_style, product_ptype_slot)])[art_product]  # per product: small
    colour_slot = np.where(rng.random(n) < 0.8, rng.integers(0, 4, n), -1)
    style_colours = np.stack(styles.colours)
    colour = np.where(colour_slot >= 0, style_colours[style, colour_slot.clip(0)],
                      rng.integers(0, len(COLOURS), n))
    appearance = _sample(rng, np.array([0.45] + [0.55 / 9] * 9), n)
    index = styles.index[style]
    style_words = np.stack(styles.words)
    word_a = style_words[style, product_word[art_product]]
    word_b = np.where(rng.random(n) < 0.7, style_words[style, rng.integers(0, 3, n)],
                      rng.integers(0, len(WORDS), n))
    feature = rng.integers(0, len(FEATURES), n)

    words = pa.array(WORDS)
    ptype_names = _pick(PRODUCT_TYPES, ptype, 1, pa.string())
    colour_names = _pick(COLOURS, colour, 1, pa.string())
    prod_name = pc.utf8_capitalize(pc.binary_join_element_wise(
        words.take(pa.array(word_a)), ptype_names, " "))
    desc = pc.binary_join_element_wise(
        pc.utf8_capitalize(words.take(pa.array(word_b))),
        pc.utf8_lower(colour_names),
        pc.utf8_lower(ptype_names),
        pa.array(FEATURES).take(pa.array(feature)), " ")
    desc = pc.binary_join_element_wise(desc, pa.scalar("."), "")
    section_no = styles.section_no[style]
    section_names = pa.array(styles.section_name).take(pa.array(style))
    dept_no = 1000 + 10 * style + np.array([PRODUCT_TYPES[p][3] % 10 for p in range(len(PRODUCT_TYPES))])[ptype]
    dept_name = pc.binary_join_element_wise(section_names, _pick(PRODUCT_TYPES, ptype, 4, pa.string()), " ")

    table = pa.table({
        "article_id": (product_code[art_product].astype(np.int64) * 1000 + variant_no),
        "product_code": product_code[art_product].astype(np.int32),
        "prod_name": prod_name,
        "product_type_no": _pick(PRODUCT_TYPES, ptype, 0, pa.int32()),
        "product_type_name": ptype_names,
        "product_group_name": _pick(PRODUCT_TYPES, ptype, 2, pa.string()),
        "graphical_appearance_no": _pick(APPEARANCES, appearance, 0, pa.int32()),
        "graphical_appearance_name": _pick(APPEARANCES, appearance, 1, pa.string()),
        "colour_group_code": _pick(COLOURS, colour, 0, pa.int32()),
        "colour_group_name": colour_names,
        "perceived_colour_value_id": _pick(COLOURS, colour, 2, pa.int32()),
        "perceived_colour_value_name": _pick(COLOURS, colour, 3, pa.string()),
        "perceived_colour_master_id": _pick(COLOURS, colour, 4, pa.int32()),
        "perceived_colour_master_name": _pick(COLOURS, colour, 5, pa.string()),
        "department_no": dept_no.astype(np.int32),
        "department_name": dept_name,
        "index_code": _pick(INDEXES, index, 0, pa.string()),
        "index_name": _pick(INDEXES, index, 1, pa.string()),
        "index_group_no": _pick(INDEXES, index, 2, pa.int32()),
        "index_group_name": _pick(INDEXES, index, 3, pa.string()),
        "section_no": section_no.astype(np.int32),
        "section_name": section_names,
        "garment_group_no": _pick(PRODUCT_TYPES, ptype, 3, pa.int32()),
        "garment_group_name": _pick(PRODUCT_TYPES, ptype, 4, pa.string()),
        "detail_desc": desc,
    }).cast(ARTICLES.schema)

    evergreen = rng.random(n) < 0.2
    seasonal = (rng.random(n) < cfg.seasonal_share) & ~evergreen
    price_level = np.array([p[5] for p in PRODUCT_TYPES])[ptype] * styles.price_level[style]
    state = {
        "style": style.astype(np.int32),
        "base": rng.lognormal(0.0, cfg.popularity_sigma, n),
        "launch": rng.integers(-30, cfg.n_weeks, n),
        "lifetime": np.where(evergreen, 1e9, rng.exponential(cfg.lifetime_weeks, n) + 2.0),
        "seasonal": seasonal,
        "season_peak": np.where(rng.random(n) < 0.5, 26.0, 0.0) + rng.normal(0, 3, n),  # summer/winter
        "price": (0.02 * price_level * rng.lognormal(0.0, 0.2, n)).astype(np.float32),
    }
    return table, state


def week_weights(art: dict, week: int, week_of_year: float) -> np.ndarray:
    age = week - art["launch"]
    life = np.where(age >= 0, np.exp(-np.maximum(age, 0) / art["lifetime"]), 0.0)
    season = np.where(art["seasonal"],
                      1.0 + 0.9 * np.cos(2 * np.pi * (week_of_year - art["season_peak"]) / 52.0), 1.0)
    return art["base"] * life * season + 1e-12


def weekly_volume(cfg: SynthConfig, start: dt.date) -> np.ndarray:
    """Transactions per week: seasonal (summer high), summing exactly to n_transactions."""
    woy = np.array([((start + dt.timedelta(weeks=w)).timetuple().tm_yday / 7.0) for w in range(cfg.n_weeks)])
    shape = 1.0 + 0.25 * np.cos(2 * np.pi * (woy - 26) / 52.0)
    exact = cfg.n_transactions * shape / shape.sum()
    counts = np.floor(exact).astype(np.int64)
    short = cfg.n_transactions - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class Generator:
    """Holds the per-customer purchase memory between weeks and produces one week at a time."""

    def __init__(self, cfg: SynthConfig, customers: dict, articles: dict, styles: Styles, customer_ids: pa.Array):
        self.cfg, self.cust, self.art, self.styles = cfg, customers, articles, styles
        self.customer_ids = customer_ids
        n_c = cfg.n_customers
        self.ring = np.zeros((n_c, RING), dtype=np.int32)
        self.ring_len = np.zeros(n_c, dtype=np.int32)
        self.ring_ptr = np.zeros(n_c, dtype=np.int32)
        self.activity_cdf = np.cumsum(customers["activity"])
        self.style_members = [np.flatnonzero(articles["style"] == s) for s in range(styles.n)]
        self.start = dt.date.fromisoformat(cfg.start_date)
        self.repurchases = 0

    def week(self, w: int, n_items: int) -> pa.Table:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, WEEK_RNG_SALT, w])
        woy = (self.start + dt.timedelta(weeks=w)).timetuple().tm_yday / 7.0
        weights = week_weights(self.art, w, woy)

        # Visits, then items: basket sizes are geometric, trimmed to hit the week's exact volume.
        sizes = rng.geometric(1.0 / cfg.basket_mean, int(n_items / cfg.basket_mean * 1.3) + 16)
        while sizes.sum() < n_items:
            sizes = np.concatenate([sizes, rng.geometric(1.0 / cfg.basket_mean, len(sizes))])
        n_visits = int(np.searchsorted(np.cumsum(sizes), n_items)) + 1
        sizes = sizes[:n_visits]
        sizes[-1] -= sizes.sum() - n_items
        visit_cust = np.searchsorted(self.activity_cdf, rng.random(n_visits) * self.activity_cdf[-1], side="right")
        visit_cust = visit_cust.clip(0, cfg.n_customers - 1)
        visit_day = rng.integers(0, 7, n_visits)
        visit_online = rng.random(n_visits) < self.cust["online"][visit_cust]
        visit_style = np.where(rng.random(n_visits) < cfg.secondary_style_share,
                               self.cust["secondary"][visit_cust], self.cust["primary"][visit_cust])

        cust = np.repeat(visit_cust, sizes)
        style = np.repeat(visit_style, sizes)
        article = np.empty(n_items, dtype=np.int64)
        u = rng.random(n_items)
        have = self.ring_len[cust]
        rep = (u < cfg.repurchase_rate) & (have > 0)
        slot = (rng.random(n_items) * np.maximum(have, 1)).astype(np.int64)
        article[rep] = self.ring[cust[rep], slot[rep]]
        rest = ~rep
        in_style = rest & (rng.random(n_items) < cfg.style_affinity)
        for s in range(self.styles.n):
            rows = np.flatnonzero(in_style & (style == s))
            members = self.style_members[s]
            if len(rows) and len(members):
                article[rows] = members[_sample(rng, weights[members], len(rows))]
        empty = np.array([len(m) == 0 for m in self.style_members])
        anywhere = np.flatnonzero(rest & (~in_style | empty[style]))
        article[anywhere] = _sample(rng, weights, len(anywhere))
        self.repurchases += int(rep.sum())

        day = np.repeat(visit_day, sizes)
        order = np.lexsort((cust, day))  # H&M's file is in date order
        cust, article, day = cust[order], article[order], day[order]
        online = np.repeat(visit_online, sizes)[order]
        self._remember(cust, article)

        base = self.art["price"][article]
        discount = np.where(rng.random(n_items) < 0.2, rng.uniform(0.5, 0.8, n_items), 1.0)
        price = (base * discount * rng.normal(1.0, 0.02, n_items)).clip(1e-4).astype(np.float32)
        day0 = (self.start - dt.date(1970, 1, 1)).days + 7 * w
        return pa.table({
            "t_dat": pa.array((day0 + day).astype(np.int32), type=pa.int32()).cast(pa.date32()),
            "customer_id": self.customer_ids.take(pa.array(cust)),
            "article_idx": pa.array(article),
            "price": pa.array(price),
            "sales_channel_id": pa.array(np.where(online, 2, 1).astype(np.int8)),
        })

    def _remember(self, cust: np.ndarray, article: np.ndarray) -> None:
        """Pushes the week's purchases into each customer's ring (only the last RING per customer)."""
        order = np.argsort(cust, kind="stable")
        c, a = cust[order], article[order]
        starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        counts = np.diff(np.r_[starts, len(c)])
        rank = np.arange(len(c)) - np.repeat(starts, counts)
        from_end = np.repeat(counts, counts) - rank - 1
        keep = from_end < RING
        uc = c[starts]
        skipped = np.maximum(counts - RING, 0)
        pos = (self.ring_ptr[c[keep]] + rank[keep] - np.repeat(skipped, counts)[keep]) % RING
        self.ring[c[keep], pos] = a[keep]
        self.ring_ptr[uc] = (self.ring_ptr[uc] + np.minimum(counts, RING)) % RING
        self.ring_len[uc] = np.minimum(self.ring_len[uc] + counts, RING)


def generate(cfg: SynthConfig, root: str, progress: bool = True) -> dict:
    """Writes customers, articles and sharded transactions under ``root``; returns a summary.

    The dataset is written aside and replaces ``root`` whole (data/staging.py), its manifest last.
    """
    with staged(root, "manifest.json") as out:
        return _generate(cfg, out, progress)


def _generate(cfg: SynthConfig, out: str, progress: bool) -> dict:
    t0 = time.perf_counter()
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    styles = Styles(np.random.default_rng(seeds[0]), cfg.n_styles)
    customers, cust_state = make_customers(cfg, np.random.default_rng(seeds[1]), styles)
    articles, art_state = make_articles(cfg, np.random.default_rng(seeds[2]), styles)
    write_parquet(customers, table_url(out, "customers"))
    write_parquet(articles, table_url(out, "articles"))
    write_parquet(pa.table({"customer_id": customers["customer_id"],
                            "primary_style": cust_state["primary"],
                            "secondary_style": cust_state["secondary"]}), join(out, "_truth", "customers.parquet"))
    gen = Generator(cfg, cust_state, art_state, styles, customers["customer_id"].combine_chunks())
    first_day = (gen.start - dt.date(1970, 1, 1)).days  # an article sells from its launch week on (data/drops.py)
    write_parquet(pa.table({"article_id": articles["article_id"], "style": art_state["style"],
                            "age_mu": styles.age_mu[art_state["style"]],
                            "launch_day": pa.array(first_day + 7 * art_state["launch"], pa.int32())}),
                  join(out, "_truth", "articles.parquet"))
    article_ids = articles["article_id"].combine_chunks()
    writer = ShardWriter(table_url(out, "transactions"), TRANSACTIONS.schema, cfg.shard_rows)
    volume = weekly_volume(cfg, gen.start)
    for w in progress_bar(range(cfg.n_weeks), progress, desc="synth weeks", mininterval=2.0):
        week = gen.week(w, int(volume[w]))
        week = week.set_column(2, "article_id", article_ids.take(week["article_idx"]))
        writer.write(week.select(TRANSACTIONS.names))
    shards = writer.close()
    summary = {
        "customers": customers.num_rows,
        "articles": articles.num_rows,
        "transactions": writer.rows,
        "shards": len(shards),
        "weeks": cfg.n_weeks,
        "first_day": cfg.start_date,
        "last_day": str(gen.start + dt.timedelta(days=7 * cfg.n_weeks - 1)),
        "repurchase_rows": gen.repurchases,
        "seconds": round(time.perf_counter() - t0, 2),
        "rows_per_s": round(writer.rows / max(time.perf_counter() - t0, 1e-9)),
        "peak_rss_mb": peak_rss_mb(),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
    write_json(summary, join(out, "manifest.json"))
    return summary


@hydra.main(config_path="../conf", config_name="synth", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    run_dir = start_run(cfg)
    if cfg.data.source != "synth":
        raise ValueError(f"data={cfg.data.name} has source={cfg.data.source!r}; data.synth needs a synth preset "
                         "(tiny, small, hm_scale); use data.ingest for real files")
    synth_cfg: SynthConfig = OmegaConf.to_object(cfg.data.synth)
    summary = generate(synth_cfg, cfg.data.root)
    write_json(summary, join(run_dir, "report.json"))
    log.info("synth %s: %d customers, %d articles, %d transactions in %d shards, %.1fs (%s rows/s), peak RSS %d MB",
             cfg.data.name, summary["customers"], summary["articles"], summary["transactions"], summary["shards"],
             summary["seconds"], f"{summary['rows_per_s']:,}", summary["peak_rss_mb"])
    return summary


if __name__ == "__main__":
    main()
