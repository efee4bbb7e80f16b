"""The output side: the row schema every result takes (``row``), the Parquet store that
keeps rows (``store``), the display grid built from them (``grid``) and the papers'
published numbers to hold them against (``published``)."""
