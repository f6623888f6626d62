<?php
// A trivial dispatch script for bench/e2e.py --script: no framework, just the bundle's contract.
// Reads DEFERRED_DATA (param, else POST field), base64-decodes it, and appends one line
// "<strlen(decoded)> <pid>" to $FASTWORKER_DEMO_LOG, as examples/php/listeners.php does, so
// the bench can count finished jobs the same way for both scripts.

declare(strict_types=1);

$data = $_SERVER['DEFERRED_DATA'] ?? ($_POST['DEFERRED_DATA'] ?? null);
if (!is_string($data) || $data === '') {
    http_response_code(400);
    error_log('trivial.php: no DEFERRED_DATA');
    exit;
}
$decoded = base64_decode($data, true);
if ($decoded === false) {
    http_response_code(400);
    error_log('trivial.php: DEFERRED_DATA is not base64');
    exit;
}
$log = getenv('FASTWORKER_DEMO_LOG', true);
$log = ($log === false || $log === '') ? '/tmp/fastworker-demo.log' : $log;
if (file_put_contents($log, strlen($decoded) . ' ' . getmypid() . "\n", FILE_APPEND | LOCK_EX) === false) {
    throw new RuntimeException("cannot write $log");
}
echo "ok\n";
