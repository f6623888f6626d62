<?php
// Latency probe of bench/e2e.py. Runs the benchmarked dispatch script ($FW_BENCH_SCRIPT, from
// the FPM pool's env) and, once it has finished, appends "<published> <done>" to
// $FW_BENCH_LATENCY_FILE: the Unix time the bench embedded in the event's payload when it
// published the message ("published=<time>"), and microtime(true) at the end of the request.

declare(strict_types=1);

$fwBenchData = $_SERVER['DEFERRED_DATA'] ?? ($_POST['DEFERRED_DATA'] ?? '');
register_shutdown_function(static function () use ($fwBenchData): void {
    $done = microtime(true);
    $decoded = base64_decode((string) $fwBenchData, true);
    if ($decoded === false || !preg_match('/published=([0-9.]+)/', $decoded, $m)) {
        return;
    }
    $file = getenv('FW_BENCH_LATENCY_FILE', true);
    if ($file !== false && $file !== '') {
        file_put_contents($file, sprintf("%s %.6f\n", $m[1], $done), FILE_APPEND | LOCK_EX);
    }
});
require getenv('FW_BENCH_SCRIPT', true);
