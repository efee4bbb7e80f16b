"""Running a suite: ``plan`` (what runs, under which key, what is shared), ``session``
(one loaded model that prunes and evaluates cells), the executors (``executor``: local;
``ray_executor``: Ray actors, following ``scheduler``), ``save`` (pruned models as Hugging Face folders) and
``run``, the driver that checks, runs and records."""
