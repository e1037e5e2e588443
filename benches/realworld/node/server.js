const http = require('http');
const isNumber = require('is-number');

if (process.argv.includes('--check')) {
  console.log('is-number', isNumber(7), isNumber('x'));
  process.exit(0);
}
http.createServer((req, res) => {
  const n = new URL(req.url, 'http://x').searchParams.get('n');
  res.end(JSON.stringify({ n, number: isNumber(n) }));
}).listen(3000);
