<?php
// A slow job for bench/e2e.py --job-ms: sleeps $FW_BENCH_JOB_MS milliseconds (the FPM pool's
// env; 0 or unset: no sleep), then records the job exactly as trivial.php does (it runs it: one
// line "<strlen(decoded)> <pid>" appended to $FASTWORKER_DEMO_LOG). The line is written after
// the sleep, so the bench counts a job when it has finished.

declare(strict_types=1);

$fwBenchJobMs = (float) (getenv('FW_BENCH_JOB_MS', true) ?: 0);
if ($fwBenchJobMs > 0) {
    usleep((int) round($fwBenchJobMs * 1000));
}
require __DIR__ . '/trivial.php';
