"""streamfn's sources and sinks, one module each: files, memory, kafka, http, cron, v3io."""
