"""What runs a job around StatefulInference: the launcher (flags, runners, errors in one line), reading events
(``io``, ``event_files``), replaying and live input (``replay``, ``live``), Parquet sinks (``sinks``) and the
summary (``summary``)."""
