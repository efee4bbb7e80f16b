"""The output side: the row schema every result takes (``row``), the Parquet store that
keeps rows (``store``, with ``upgrade`` for older schema versions), the display grid built
from them (``grid``), the papers' published numbers to hold them against (``published``)
and the generated reference pages (``reference``)."""
