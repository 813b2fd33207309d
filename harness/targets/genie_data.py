"""The built-in data of the `genie` target: the analytics question bank its seeded conversations are drawn
from, the colleagues who own some of them, and the vocabulary its generated SQL and results are made of.

Plain data only; `harness.targets.genie` turns it into conversations, SQL and result sets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thread:
    """A conversation people have with a retail analytics space: a first question, other ways people
    word it, and the follow-ups they ask next, in the order they tend to ask them."""

    question: str
    paraphrases: tuple[str, ...]
    follow_ups: tuple[str, ...]


THREADS: tuple[Thread, ...] = (
    # Ordered by popularity: the seeded history draws the first threads more often, so that several
    # conversations start with the very same question (what a question cache should hit).
    Thread(
        "What were total sales last month?",
        ("What was our total revenue last month?", "Show me total sales for last month"),
        (
            "Break that down by region",
            "Which region grew the most compared to the month before?",
            "Only include online orders",
            "Show the same numbers for last year",
        ),
    ),
    Thread(
        "Who are our top 10 customers by revenue this year?",
        ("List the top 10 customers by revenue this year", "Which customers spent the most this year?"),
        (
            "How many orders did each of them place?",
            "Add their customer segment",
            "What about last year?",
        ),
    ),
    Thread(
        "Show monthly revenue for the last 12 months",
        (
            "What is the monthly revenue trend over the last 12 months?",
            "Plot revenue by month for the last year",
        ),
        (
            "Add the same months from the previous year",
            "Which month had the biggest drop?",
            "Split it by channel",
        ),
    ),
    Thread(
        "How many orders did we ship last week?",
        ("Number of orders shipped last week",),
        ("Break that down by day", "How many of them were late?", "Compare with the week before"),
    ),
    Thread(
        "What is the average order value by channel?",
        ("Show the average order value per sales channel",),
        ("Break that down by month", "Only for the last quarter", "Which channel has the highest?"),
    ),
    Thread(
        "Which product categories have the highest return rate?",
        ("What categories get returned the most?",),
        (
            "Show the top 5 only",
            "What are the most returned products in the first one?",
            "How has that changed over the last 6 months?",
        ),
    ),
    Thread(
        "How many new customers did we acquire this quarter?",
        ("Count of new customers this quarter",),
        (
            "Break that down by acquisition channel",
            "What share of them placed a second order?",
            "Compare to last quarter",
        ),
    ),
    Thread(
        "What is the gross margin by product category?",
        ("Show gross margin per product category",),
        ("Sort by the largest first", "Only for the last 3 months", "Which category improved the most?"),
    ),
    Thread(
        "Which stores had the highest sales last quarter?",
        ("Top stores by sales last quarter",),
        ("Limit to the top 10", "Show their year over year growth", "Which region are they in?"),
    ),
    Thread(
        "What is total revenue year to date?",
        ("How much revenue have we made so far this year?",),
        ("Compare to the same period last year", "Break that down by quarter"),
    ),
    Thread(
        "What is the customer churn rate by segment?",
        (),
        ("Break that down by month", "Which segment is getting worse?"),
    ),
    Thread(
        "How many units of each product did we sell yesterday?",
        (),
        ("Only show products with more than 100 units", "Compare with the same day last week"),
    ),
    Thread(
        "What percentage of orders used a discount code last month?",
        (),
        ("Which discount codes were used the most?", "What was the average discount amount?"),
    ),
    Thread(
        "Show sales by region and category for this year",
        (),
        ("Which combination grew the fastest?", "Show it as a percentage of the total"),
    ),
    Thread(
        "What is the repeat purchase rate for customers who joined last year?",
        (),
        ("Break that down by first purchase category", "How does it compare with the year before?"),
    ),
    Thread(
        "Which products are running low on inventory?",
        (),
        ("Only in the West region", "How many days of stock do they have left?"),
    ),
    Thread(
        "What were our best selling products during the holiday season?",
        (),
        ("Show the top 20", "How did they do compared to the previous holiday season?"),
    ),
    Thread(
        "How long does it take on average to deliver an order?",
        (),
        ("Break that down by carrier", "Which region has the slowest deliveries?"),
    ),
    Thread(
        "What is the average basket size on weekends versus weekdays?",
        (),
        ("Break that down by store", "Only for the last 8 weeks"),
    ),
    Thread(
        "How much revenue came from returning customers this month?",
        (),
        ("What share of total revenue is that?", "Show the trend over the last 6 months"),
    ),
    Thread(
        "What is the conversion rate of the online store by week?",
        (),
        ("Split it by device type", "Which week was the lowest?"),
    ),
    Thread(
        "Which sales reps closed the most revenue last quarter?",
        (),
        ("Show their win rates", "Only for the enterprise segment"),
    ),
)

GENERIC_FOLLOW_UPS: tuple[str, ...] = (
    "Break that down by month",
    "Break that down by region",
    "Show the same for last year",
    "Sort by the largest first",
    "Limit it to the top 10",
    "Show it as a percentage of the total",
    "Exclude returns",
    "What about online orders only?",
    "Can you show that as a weekly trend?",
    "Why did it drop?",
)
"""Follow-ups that fit after any question, used when a thread has run out of its own."""

COLLEAGUES: tuple[str, ...] = (
    "ana.silva@example.com",
    "bo.chen@example.com",
    "carla.jones@example.com",
    "dev.patel@example.com",
    "emma.muller@example.com",
    "farid.haddad@example.com",
)
"""The other users of the space, who own the seeded conversations that are not the caller's."""

EMPTY_ANSWER = "Please ask a question about the data in this space."
"""What Genie answers to a message without content."""


# --- the vocabulary of generated SQL and results ------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """A GROUP BY column: the words that ask for it, its SQL, and the values it takes."""

    alias: str
    label: str
    keywords: tuple[str, ...]
    expr: str
    values: tuple[str, ...]
    """Fixed values; empty for the time dimensions, whose values follow the calendar."""


@dataclass(frozen=True)
class Measure:
    """An aggregate column: the words that ask for it, its SQL, its type and its range."""

    alias: str
    label: str
    keywords: tuple[str, ...]
    expr: str
    type_name: str
    low: float
    high: float


@dataclass(frozen=True)
class Period:
    """A time filter: the phrases that ask for it and its WHERE clause."""

    label: str
    phrases: tuple[str, ...]
    where: str


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("month", "month", ("month", "monthly", "trend"), "date_format(o.order_date, 'yyyy-MM')", ()),
    Dimension(
        "week", "week", ("week", "weekly", "weekend", "weekends"), "date_trunc('WEEK', o.order_date)", ()
    ),
    Dimension("day", "day", ("day", "daily"), "o.order_date", ()),
    Dimension(
        "quarter",
        "quarter",
        ("quarter", "quarterly"),
        "concat(year(o.order_date), '-Q', quarter(o.order_date))",
        (),
    ),
    Dimension(
        "region", "region", ("region", "regions"), "s.region", ("West", "East", "Central", "South", "North")
    ),
    Dimension(
        "category",
        "product category",
        ("category", "categories"),
        "p.category",
        ("Apparel", "Electronics", "Home & Garden", "Beauty", "Sports", "Toys", "Grocery", "Books"),
    ),
    Dimension(
        "channel",
        "sales channel",
        ("channel", "channels", "online"),
        "o.channel",
        ("Online", "In-store", "Marketplace", "Phone"),
    ),
    Dimension(
        "store",
        "store",
        ("store", "stores"),
        "s.store_name",
        (
            "Seattle Downtown",
            "Portland Pearl",
            "Denver Union",
            "Austin South",
            "Chicago Loop",
            "Atlanta Midtown",
            "Boston Back Bay",
            "Miami Brickell",
            "Phoenix Central",
            "Minneapolis North",
        ),
    ),
    Dimension(
        "product",
        "product",
        ("product", "products", "selling"),
        "p.product_name",
        (
            "Trail Runner 2 Shoes",
            "Noise-Cancelling Headphones",
            "Cast Iron Skillet",
            "Organic Cotton Tee",
            "Smart Thermostat",
            "Yoga Mat Pro",
            "Espresso Machine",
            "LED Desk Lamp",
            "Kids Building Set",
            "Vitamin C Serum",
            "Waterproof Jacket",
            "Bluetooth Speaker",
        ),
    ),
    Dimension(
        "customer",
        "customer",
        ("top 10 customers", "which customers", "each customer", "customer name"),
        "c.customer_name",
        (
            "Northwind Traders",
            "Contoso Retail",
            "Fabrikam Outfitters",
            "Tailspin Toys",
            "Wide World Importers",
            "Adventure Works",
            "Alpine Ski House",
            "Coho Vineyard",
            "Lucerne Publishing",
            "Proseware Inc",
            "Litware Supplies",
            "Woodgrove Goods",
        ),
    ),
    Dimension(
        "segment",
        "customer segment",
        ("segment", "segments", "enterprise"),
        "c.segment",
        ("Consumer", "Small Business", "Enterprise", "Public Sector"),
    ),
    Dimension("carrier", "carrier", ("carrier", "carriers"), "o.carrier", ("UPS", "FedEx", "USPS", "DHL")),
    Dimension(
        "sales_rep",
        "sales rep",
        ("rep", "reps"),
        "r.rep_name",
        ("Jordan Lee", "Priya Nair", "Mateo Rossi", "Hannah Berg", "Kwame Mensah", "Sofia Duarte"),
    ),
    Dimension(
        "device_type", "device type", ("device",), "o.device_type", ("Mobile", "Desktop", "Tablet", "App")
    ),
    Dimension(
        "discount_code",
        "discount code",
        ("code", "codes"),
        "o.discount_code",
        ("WELCOME10", "SPRING20", "FREESHIP", "VIP15", "FLASH30"),
    ),
)

DEFAULT_DIMENSIONS: tuple[str, ...] = ("region", "category", "channel")
"""What a question that names no dimension is grouped by (picked by the question's hash)."""

MEASURES: tuple[Measure, ...] = (
    # Checked in this order: the more specific wording first ("average order value" before "order").
    Measure(
        "avg_order_value",
        "average order value",
        ("average order", "order value", "basket"),
        "AVG(o.order_total)",
        "DOUBLE",
        35,
        180,
    ),
    Measure("gross_margin", "gross margin", ("margin",), "SUM(o.gross_margin)", "DOUBLE", 20_000, 900_000),
    Measure(
        "return_rate",
        "return rate",
        ("return", "returned"),
        "AVG(CAST(o.is_returned AS DOUBLE))",
        "DOUBLE",
        0.01,
        0.2,
    ),
    Measure("churn_rate", "churn rate", ("churn",), "AVG(CAST(c.churned AS DOUBLE))", "DOUBLE", 0.02, 0.15),
    Measure(
        "conversion_rate",
        "conversion rate",
        ("conversion", "win rate"),
        "SUM(o.orders) / SUM(o.sessions)",
        "DOUBLE",
        0.01,
        0.08,
    ),
    Measure(
        "repeat_rate",
        "repeat purchase rate",
        ("repeat", "second order"),
        "AVG(CAST(c.order_count > 1 AS DOUBLE))",
        "DOUBLE",
        0.15,
        0.6,
    ),
    Measure(
        "discount_share",
        "share of orders with a discount",
        ("discount",),
        "AVG(CAST(o.discount_code IS NOT NULL AS DOUBLE))",
        "DOUBLE",
        0.05,
        0.4,
    ),
    Measure(
        "avg_delivery_days",
        "average delivery time in days",
        ("deliver", "deliveries", "late"),
        "AVG(datediff(o.delivered_date, o.order_date))",
        "DOUBLE",
        1.5,
        7,
    ),
    Measure("units_on_hand", "units on hand", ("inventory", "stock"), "SUM(i.units_on_hand)", "LONG", 0, 500),
    Measure("units_sold", "units sold", ("units", "selling"), "SUM(o.quantity)", "LONG", 50, 5_000),
    Measure(
        "net_sales",
        "net sales",
        ("sales", "revenue", "spent", "spend"),
        "SUM(o.net_amount)",
        "DOUBLE",
        10_000,
        2_000_000,
    ),
    Measure(
        "order_count",
        "orders",
        ("order", "orders", "shipped"),
        "COUNT(DISTINCT o.order_id)",
        "LONG",
        100,
        20_000,
    ),
    Measure(
        "customer_count",
        "customers",
        ("customer", "customers"),
        "COUNT(DISTINCT o.customer_id)",
        "LONG",
        20,
        4_000,
    ),
)

DEFAULT_MEASURES: tuple[str, ...] = ("net_sales", "order_count")
"""What a question that names no measure computes (picked by the question's hash)."""

PERIODS: tuple[Period, ...] = (
    Period("yesterday", ("yesterday",), "o.order_date = date_sub(current_date(), 1)"),
    Period(
        "last week",
        ("last week", "week before"),
        "o.order_date >= date_sub(date_trunc('WEEK', current_date()), 7) "
        "AND o.order_date < date_trunc('WEEK', current_date())",
    ),
    Period("over the last 8 weeks", ("last 8 weeks",), "o.order_date >= date_sub(current_date(), 56)"),
    Period(
        "last month",
        ("last month", "month before"),
        "o.order_date >= add_months(date_trunc('MONTH', current_date()), -1) "
        "AND o.order_date < date_trunc('MONTH', current_date())",
    ),
    Period("this month", ("this month",), "o.order_date >= date_trunc('MONTH', current_date())"),
    Period(
        "over the last 3 months",
        ("last 3 months",),
        "o.order_date >= add_months(current_date(), -3)",
    ),
    Period(
        "over the last 6 months",
        ("last 6 months",),
        "o.order_date >= add_months(current_date(), -6)",
    ),
    Period(
        "last quarter",
        ("last quarter",),
        "o.order_date >= add_months(date_trunc('QUARTER', current_date()), -3) "
        "AND o.order_date < date_trunc('QUARTER', current_date())",
    ),
    Period("this quarter", ("this quarter",), "o.order_date >= date_trunc('QUARTER', current_date())"),
    Period(
        "in the holiday season",
        ("holiday season",),
        "month(o.order_date) IN (11, 12) AND year(o.order_date) = year(current_date()) - 1",
    ),
    Period(
        "last year",
        ("last year", "previous year", "year before"),
        "year(o.order_date) = year(current_date()) - 1",
    ),
    Period(
        "this year",
        ("this year", "year to date", "so far this year"),
        "o.order_date >= date_trunc('YEAR', current_date())",
    ),
    Period(
        "over the last 12 months",
        ("last 12 months", "past year"),
        "o.order_date >= add_months(current_date(), -12)",
    ),
)

DEFAULT_PERIOD = Period("over the last 12 months", (), "o.order_date >= add_months(current_date(), -12)")
"""The time filter of a question that names no period."""

TABLES = (
    "main.retail.orders o\n"
    "  JOIN main.retail.stores s ON o.store_id = s.store_id\n"
    "  JOIN main.retail.products p ON o.product_id = p.product_id\n"
    "  JOIN main.retail.customers c ON o.customer_id = c.customer_id\n"
    "  LEFT JOIN main.retail.sales_reps r ON o.rep_id = r.rep_id\n"
    "  LEFT JOIN main.retail.inventory i ON o.product_id = i.product_id AND o.store_id = i.store_id"
)
"""The FROM clause of every generated query: a small retail star schema."""

MESSAGE_ERRORS: tuple[tuple[str, str], ...] = (
    (
        "The AI model did not answer in time; please try again.",
        "CHAT_COMPLETION_CLIENT_TIMEOUT_EXCEPTION",
    ),
    ("Genie could not find tables relevant to this question.", "NO_TABLES_TO_QUERY_EXCEPTION"),
    (
        "The generated SQL references a table that does not exist: main.retail.orders_archive.",
        "INVALID_SQL_UNKNOWN_TABLE_EXCEPTION",
    ),
    (
        "The AI model's rate limit was exceeded; please try again shortly.",
        "RATE_LIMIT_EXCEEDED_GENERIC_EXCEPTION",
    ),
)
"""(error, type) pairs a FAILED message reports, as the real service's `MessageError` does."""

STATEMENT_ERRORS: tuple[tuple[str, str, str], ...] = (
    (
        "BAD_REQUEST",
        "[TABLE_OR_VIEW_NOT_FOUND] The table or view `main.retail.orders_archive` cannot be found. "
        "SQLSTATE: 42P01",
        "42P01",
    ),
    (
        "BAD_REQUEST",
        "[DIVIDE_BY_ZERO] Division by zero. Use `try_divide` to tolerate divisor being 0. SQLSTATE: 22012",
        "22012",
    ),
    ("DEADLINE_EXCEEDED", "Query has been timed out. Timeout: 172800 seconds.", "57KD0"),
)
"""(error_code, message, sql_state) triples a FAILED statement reports."""
