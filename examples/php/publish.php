<?php
// Publishes OrderPlaced events the way the fervo deferred-event bundle's AMQP backend does:
// php-amqplib, the queue declared non-durable (queue_declare($q, false, false, false, false)),
// one non-persistent message per event on the default exchange with routing key = queue, the body
// in the bundle's QueueMessage format (header lines, a blank line, base64(serialize($event))).
//
//   php publish.php --queue Q --count N --size BYTES [--host 127.0.0.1 --port 5672]
//       [--user guest --pass guest] [--dispatch PATH] [--fpm-host H --fpm-port P]
//       [--fail-every K] [--start-id ID]
//
// --size is the payload size of each event; every K-th event (--fail-every) gets a payload that
// starts with "FAIL", which the example listener rejects.

declare(strict_types=1);

require_once '/usr/share/php/PhpAmqpLib/autoload.php';
require __DIR__ . '/listeners.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

// The bundle's QueueMessage::getFormattedMessage(): empty values are left out.
function bundle_format(array $headers, string $data): string
{
    $message = '';
    foreach ($headers as $name => $value) {
        if (empty($value)) {
            continue;
        }
        $message .= sprintf("%s: %s\n", $name, $value);
    }
    return $message . "\n" . $data;
}

function usage(string $error = ''): never
{
    if ($error !== '') {
        fwrite(STDERR, "publish.php: $error\n");
    }
    fwrite(STDERR, "usage: php publish.php --queue Q --count N --size BYTES [--host H --port P]"
        . " [--user U --pass P] [--dispatch PATH] [--fpm-host H --fpm-port P] [--fail-every K]"
        . " [--start-id ID]\n");
    exit($error === '' ? 0 : 2);
}

$opts = getopt('', [
    'queue:', 'count:', 'size:', 'host:', 'port:', 'user:', 'pass:', 'vhost:', 'dispatch:',
    'fpm-host:', 'fpm-port:', 'fail-every:', 'start-id:', 'console:', 'help',
]);
if ($opts === false || isset($opts['help'])) {
    usage();
}
foreach ($opts as $k => $v) {
    if (is_array($v)) {
        usage("--$k given more than once");
    }
}

$int = static function (string $name, int $default, int $min) use ($opts): int {
    if (!isset($opts[$name])) {
        return $default;
    }
    if (!preg_match('/^\d+$/', (string) $opts[$name]) || (int) $opts[$name] < $min) {
        usage("--$name must be an integer >= $min");
    }
    return (int) $opts[$name];
};

$queue = $opts['queue'] ?? 'sf_deferred_events';
$count = $int('count', 1, 0);
$size = $int('size', 64, 0);
$failEvery = $int('fail-every', 0, 0);
$startId = $int('start-id', 1, 0);
$host = $opts['host'] ?? '127.0.0.1';
$port = $int('port', 5672, 1);
$dispatch = $opts['dispatch'] ?? (realpath(__DIR__ . '/dispatch.php') ?: __DIR__ . '/dispatch.php');

$headers = [
    'php_bin' => PHP_BINARY,
    'console_path' => $opts['console'] ?? __DIR__ . '/console',
    'dispatch_path' => $dispatch,
    'fastcgi_host' => $opts['fpm-host'] ?? '127.0.0.1',
    'fastcgi_port' => (string) $int('fpm-port', 9000, 1),
];

$connection = new AMQPStreamConnection(
    $host, $port, $opts['user'] ?? 'guest', $opts['pass'] ?? 'guest', $opts['vhost'] ?? '/'
);
$channel = $connection->channel();
// As the bundle: passive=false, durable=false, exclusive=false, auto_delete=false.
$channel->queue_declare($queue, false, false, false, false);

$started = microtime(true);
$bytes = 0;
$failing = 0;
for ($i = 0; $i < $count; $i++) {
    $id = $startId + $i;
    $fail = $failEvery > 0 && ($i + 1) % $failEvery === 0;
    $prefix = ($fail ? 'FAIL ' : '') . "order-$id:";
    // Exactly --size bytes (a failing one keeps at least its "FAIL" marker).
    $fill = str_repeat(chr(97 + $id % 26), max(0, $size - strlen($prefix)));
    $payload = substr($prefix . $fill, 0, max($size, $fail ? 4 : 0));
    $failing += $fail ? 1 : 0;

    $data = base64_encode(serialize(new OrderPlaced($id, $payload)));
    $body = bundle_format($headers, $data);
    $bytes += strlen($body);
    // Like the bundle: new AMQPMessage($body), no properties, so not persistent.
    $channel->basic_publish(new AMQPMessage($body), '', $queue);
}

$channel->close();
$connection->close();

printf(
    "published %d events (%d set to fail) to queue %s on %s:%d: %d bytes in %.2fs, dispatch %s\n",
    $count, $failing, $queue, $host, $port, $bytes, microtime(true) - $started, $dispatch
);
