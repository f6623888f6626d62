<?php
// Publishes one message (body from STDIN) with php-amqplib, its AMQP timestamp property set to
// any 64-bit integer, as php-amqplib lets a PHP app do:
//   php publish_with_timestamp.php HOST PORT QUEUE TIMESTAMP < body
declare(strict_types=1);

require_once '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

[$_, $host, $port, $queue, $timestamp] = $argv;
$connection = new AMQPStreamConnection($host, (int) $port, 'guest', 'guest');
$channel = $connection->channel();
$body = stream_get_contents(STDIN);
$channel->basic_publish(new AMQPMessage($body, ['timestamp' => (int) $timestamp]), '', $queue);
$channel->close();
$connection->close();
