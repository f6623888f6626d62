<?php
// Prints what the script received, as JSON: params, POST fields, body size and the ini values a
// worker may set per request. For tests of the params the worker sends.
$server = [];
foreach ($_SERVER as $k => $v) {
    if (is_string($v) && getenv($k, true) !== $v) {
        $server[$k] = $v;   // FastCGI params only, not the process environment
    }
}
if (isset($server['DEFERRED_DATA']) && strlen($server['DEFERRED_DATA']) > 256) {
    $server['DEFERRED_DATA'] = 'sha1:' . sha1($server['DEFERRED_DATA']);
}
$post = [];
foreach ($_POST as $k => $v) {
    $post[$k] = is_string($v) ? ['len' => strlen($v), 'sha1' => sha1($v)] : $v;
}
header('Content-Type: application/json');
echo json_encode([
    'pid' => getmypid(),
    'server' => $server,
    'post' => $post,
    'display_errors' => ini_get('display_errors'),
    'input_len' => strlen(file_get_contents('php://input')),
], JSON_UNESCAPED_SLASHES | JSON_PRETTY_PRINT), "\n";
