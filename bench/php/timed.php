<?php
// Latency probe of bench/e2e.py (the latency phase and --rate runs). Its first statement takes
// microtime(true): the moment PHP starts running the request's script. Then it runs the benchmarked dispatch script
// ($FW_BENCH_SCRIPT, from the FPM pool's env) and, once that has finished, appends
// "<published> <start> <end>" to $FW_BENCH_LATENCY_FILE: the Unix time the bench embedded in
// the event's payload just before publishing the message ("published=<time>"), the start time,
// and microtime(true) at the end of the request (in a shutdown function).
// No declare(strict_types=1): it would have to come before the first statement.

$fwBenchStart = microtime(true);
$fwBenchData = $_SERVER['DEFERRED_DATA'] ?? ($_POST['DEFERRED_DATA'] ?? '');
register_shutdown_function(static function () use ($fwBenchStart, $fwBenchData): void {
    $end = microtime(true);
    $decoded = base64_decode((string) $fwBenchData, true);
    if ($decoded === false || !preg_match('/published=([0-9.]+)/', $decoded, $m)) {
        return;
    }
    $file = getenv('FW_BENCH_LATENCY_FILE', true);
    if ($file !== false && $file !== '') {
        file_put_contents(
            $file,
            sprintf("%s %.6f %.6f\n", $m[1], $fwBenchStart, $end),
            FILE_APPEND | LOCK_EX
        );
    }
});
require getenv('FW_BENCH_SCRIPT', true);
