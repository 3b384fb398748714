// Uses its dependency, starts a child process (a Unix socketpair underneath: the guest has
// local sockets) and tries to listen on TCP (the guest has no network protocol at all).
const isNumber = require('is-number');
const { execFileSync } = require('child_process');
const net = require('net');

console.log('is-number', isNumber(5), isNumber('x'));
console.log('child', execFileSync('echo', ['from a child']).toString().trim());
const server = net.createServer();
server.on('error', (e) => console.log('inet', e.code));
server.listen(8080, '127.0.0.1', () => {
  console.log('inet listening');
  server.close();
});
