<?php
// Records what the worker told this run about its job: one JSON line per run in
// "<FW_RECORD_FILE>.context" with the FASTWORKER_* params, HTTP_TRACEPARENT and HTTP_TRACESTATE
// (null when not set), sha1(data) and the time the run started. Data whose base64-decoded text
// holds "FAIL ALWAYS" fails every run; "FAIL UNTIL 3" fails attempts 1 and 2, then succeeds.
require __DIR__ . '/_common.php';
require __DIR__ . '/_attempts.php';

$data = fw_require_data();
$run = ['sha1' => sha1($data), 'time' => microtime(true), 'pid' => getmypid()];
foreach ([
    'FASTWORKER_JOB_ID', 'FASTWORKER_ATTEMPT', 'FASTWORKER_QUEUE', 'FASTWORKER_FIRST_ENQUEUED',
    'HTTP_TRACEPARENT', 'HTTP_TRACESTATE',
] as $name) {
    $run[$name] = $_SERVER[$name] ?? null;
}
$text = fw_decoded($data);
$attempt = (int) ($_SERVER['FASTWORKER_ATTEMPT'] ?? 0);
$run['failed'] = str_contains($text, 'FAIL ALWAYS')
    || (str_contains($text, 'FAIL UNTIL 3') && $attempt < 3);
$line = json_encode($run, JSON_UNESCAPED_SLASHES) . "\n";
if (file_put_contents(fw_record_file() . '.context', $line, FILE_APPEND | LOCK_EX) === false) {
    throw new RuntimeException('cannot append to ' . fw_record_file() . '.context');
}
if ($run['failed']) {
    throw new RuntimeException("context.php: attempt $attempt of " . sha1($data) . ' fails');
}
echo "ok\n";
