"""The fork-server benchmark's app: a small catalogue service.

What a real Python service loads before it serves anything: Flask,
SQLAlchemy, NumPy and pandas (Debian packages), reference data as Python
objects (a catalogue of 100,000 items), a price table as a DataFrame, and an
ORM model. Each request looks an item up, runs a small pandas/NumPy query and
an ORM query on the worker's own SQLite database, and answers JSON: it
allocates and frees as a real handler does, and reads the shared data (which
writes reference counts into the pages that hold it).
"""
import os
import random

import flask
import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session, declarative_base

ITEMS = 100_000
REGIONS = ["eu", "us", "apac", "latam"]

# Reference data, loaded once: what a fork server shares with every worker.
CATALOGUE = {
    i: {"sku": f"SKU-{i:06d}", "name": f"item {i}", "tags": [f"t{i % 97}", f"t{i % 13}"], "weight": (i % 500) / 10}
    for i in range(ITEMS)
}
_rng = np.random.default_rng(42)
PRICES = pd.DataFrame({
    "item": np.repeat(np.arange(ITEMS), 2),
    "region": np.tile(np.array(REGIONS[:2]), ITEMS),
    "price": _rng.gamma(2.0, 20.0, 2 * ITEMS).round(2),
}).set_index("item").sort_index()
STATS = {r: float(PRICES.loc[PRICES.region == r, "price"].mean()) for r in REGIONS[:2]}

Base = declarative_base()


class Order(Base):
    __tablename__ = "orders"
    id = sa.Column(sa.Integer, primary_key=True)
    item = sa.Column(sa.Integer, index=True)
    quantity = sa.Column(sa.Integer)


_engine = None  # per process: a connection must not cross a fork


def engine():
    global _engine
    if _engine is None:
        _engine = sa.create_engine("sqlite://")
        Base.metadata.create_all(_engine)
        with Session(_engine) as s:
            s.add_all(Order(item=random.randrange(ITEMS), quantity=random.randrange(1, 5)) for _ in range(2000))
            s.commit()
    return _engine


app = flask.Flask(__name__)


@app.route("/item/<int:i>")
def item(i):
    i %= ITEMS
    entry = CATALOGUE[i]
    prices = PRICES.loc[i]
    near = PRICES.iloc[max(0, 2 * i - 50):2 * i + 50]["price"].to_numpy()
    with Session(engine()) as s:
        orders = s.query(Order).filter(Order.item.between(i - 50, i + 50)).limit(20).all()
        total = sum(o.quantity for o in orders)
    return flask.jsonify(
        sku=entry["sku"], name=entry["name"], tags=entry["tags"],
        prices={r: float(p) for r, p in zip(prices["region"], prices["price"])},
        nearby={"mean": float(np.mean(near)), "p90": float(np.percentile(near, 90))},
        region_means=STATS, orders=total, pid=os.getpid(),
    )


@app.route("/health")
def health():
    return "ok"
