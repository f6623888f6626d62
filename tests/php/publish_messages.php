<?php
// Publishes messages with php-amqplib, the way a PHP app does (no message_id unless given),
// one JSON object per STDIN line: {"body_base64": ..., "headers": {...}, "properties": {...}}.
// The headers go in an AMQPTable, as an app sets x-delay or traceparent. Prints, per message,
// the time (microtime) just before it was published; confirms every publish before exiting.
//   php publish_messages.php HOST PORT QUEUE < lines
declare(strict_types=1);

require_once '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;

[$_, $host, $port, $queue] = $argv;
$connection = new AMQPStreamConnection($host, (int) $port, 'guest', 'guest');
$channel = $connection->channel();
$channel->confirm_select();
while (($line = fgets(STDIN)) !== false) {
    if (trim($line) === '') {
        continue;
    }
    $spec = json_decode($line, true, 512, JSON_THROW_ON_ERROR);
    $properties = $spec['properties'] ?? [];
    if (!empty($spec['headers'])) {
        $properties['application_headers'] = new AMQPTable($spec['headers']);
    }
    $message = new AMQPMessage(base64_decode($spec['body_base64'], true), $properties);
    printf("%.6f\n", microtime(true));
    $channel->basic_publish($message, '', $queue);
}
$channel->wait_for_pending_acks(30);
$channel->close();
$connection->close();
